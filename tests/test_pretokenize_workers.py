"""The worker pool of pre-tokenization (data/pretok_workers.py): order, errors, and a worker that dies."""

from __future__ import annotations

import os
import signal

import pytest

from data.inputs.item import InputItem
from data.item_processor import ItemError
from data.pretok_workers import CRASH_MESSAGE, prepare_stream


class StubProcessor:
    """prepare(): 'crash' kills the worker process (SIGKILL, as the OOM killer does), 'bad' raises ItemError, 'bug' a
    KeyError (not bad input)."""

    def prepare(self, item, base_dir):
        what = item["what"]
        if what == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "bad":
            raise ItemError("2 <|image|> placeholder(s) in the conversation but 1 image(s) given")
        if what == "bug":
            raise KeyError("surprise")
        return f"prepared {what}"


def items(whats):
    return [InputItem(i, f"in.jsonl line {i + 1}", {"what": w}) for i, w in enumerate(whats)]


WHATS = ["ok"] * 5 + ["crash"] + ["ok"] * 3 + ["bad", "bug"] + ["ok"] * 20 + ["crash"] + ["ok"] * 4


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_worker_crash_rejects_only_its_item_and_the_run_goes_on_in_order(num_workers):
    out = list(prepare_stream(StubProcessor(), items(WHATS), None, num_workers))
    assert [p.item.id for p in out] == list(range(len(WHATS)))
    for p, w in zip(out, WHATS):
        if w == "ok":
            assert p.error is None and p.prepared == "prepared ok"
        elif w == "crash":
            assert p.reason == "crash" and p.error == f"{p.item.where}: {CRASH_MESSAGE}"
        elif w == "bad":
            assert p.reason == "conversation" and "placeholder" in p.error and p.error.startswith("in.jsonl line 10: ")
        else:  # not bad input: a bug, handed on with its traceback for the run to stop on, never a rejection
            assert p.error is None and p.reason is None and p.prepared is None
            assert p.bug.startswith("Traceback (most recent call last)") and p.bug.endswith("KeyError: 'surprise'\n")
            assert 'raise KeyError("surprise")' in p.bug


def test_results_do_not_depend_on_the_number_of_workers():
    whats = [w for w in WHATS if w != "crash"]  # in-process (0 workers) a crash would kill the test
    runs = [[(p.item.id, p.prepared, p.error, p.reason, p.bug and p.bug.splitlines()[-1]) for p in
             prepare_stream(StubProcessor(), items(whats), None, n)] for n in (0, 1, 3)]
    assert runs[0] == runs[1] == runs[2]


def test_input_errors_pass_through_without_calling_the_processor():
    it = InputItem(0, "in.jsonl line 1", error="in.jsonl line 1: not a JSON line")
    (p,) = prepare_stream(StubProcessor(), [it], None, 1)
    assert (p.error, p.reason) == ("in.jsonl line 1: not a JSON line", "input")

"""Pre-tokenization tells a bug and a wrong setting from bad data (data/pretok_errors.py, pre_tokenize.py).

A bug (an exception that is not ItemError / ImageLoadError / VideoLoadError) stops the run with exit 1, the
item and the traceback, no done.json; the re-run after the fix continues exactly once. Too many rejections
(--max_error_rate after 200 items, --max_consecutive_errors) stop it with exit 3 and the most common reasons;
nothing of that run is kept, and the fixed re-run ends byte-identical to a clean run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.item_processor import ItemProcessor
from pre_tokenize.pre_tokenize import PretokArgs, main

TARGET = "32"  # 32x32 crops: 2x2 codes, the cheapest encode
FILES = ["tokens.bin", "record.jsonl", "errors.jsonl", "run.json", "done.json"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def rank_files(out: Path) -> dict[str, bytes]:
    return {n: (out / f"0-of-1-{n}").read_bytes() for n in FILES}


def pretok(inp: Path, out: Path, bundle: Path, *extra: str) -> int:
    return main(["--in_filename", str(inp), "--out_dir", str(out), "--tokenizer_dir", str(bundle), "--target_size",
                 TARGET, "--no_progress", "--commit_items", "1", *extra])


@pytest.fixture(scope="module")
def images_data(tmp_path_factory) -> Path:
    """40 items: text-only ones and ones with an image, and 4 bad ones (a missing image, a bad role)."""
    d = tmp_path_factory.mktemp("failures_data")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / "img" / f"{k}.png")
    with open(d / "data.jsonl", "w") as f:
        for i in range(40):
            if i in (5, 23):
                item = {"conversations": conv("<|image|> what?", "x"), "image": ["img/missing.png"]}
            elif i in (9, 30):
                item = {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}
            elif i % 3 == 0:
                item = {"conversations": conv(f"Text only {i}.", f"Answer {i}.")}
            else:
                item = {"conversations": conv(f"<|image|> number {i}?", f"It is {i}."), "image": [f"img/{i % 4}.png"]}
            f.write(json.dumps(item) + "\n")
    return d / "data.jsonl"


@pytest.fixture(scope="module")
def clean(images_data, tiny_bundle, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("clean")
    assert pretok(images_data, out, tiny_bundle, "--num_workers", "0") == 0
    return rank_files(out)


def _buggy(method: str, bad_answer: str):
    """ItemProcessor.prepare / .assemble raising a programming error (TypeError) on the item whose answer is
    ``bad_answer``."""
    real = getattr(ItemProcessor, method)

    def prepare(self, item, base_dir=None):
        if item["conversations"][-1]["value"] == bad_answer:
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        return real(self, item, base_dir)

    def assemble(self, prepared, codes):
        if bad_answer in self.tokenizer.decode_text(prepared.segments[-1]):
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        return real(self, prepared, codes)

    return prepare if method == "prepare" else assemble


@pytest.mark.parametrize("method,num_workers", [("prepare", "0"), ("prepare", "2"), ("assemble", "0")])
def test_a_bug_stops_the_run_with_the_item_and_traceback_and_the_rerun_after_the_fix_continues_exactly_once(
        images_data, clean, tiny_bundle, tmp_path, monkeypatch, caplog, method, num_workers):
    out = tmp_path / "out"
    monkeypatch.setattr(ItemProcessor, method, _buggy(method, "It is 17."))  # item 17; workers fork after this
    assert pretok(images_data, out, tiny_bundle, "--num_workers", num_workers) == 1
    assert "data.jsonl line 18 (id 17): TypeError: unsupported operand" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text and "a bug" in caplog.text
    assert not (out / "0-of-1-done.json").exists()  # nothing marked done
    errors = [json.loads(line)["id"] for line in (out / "0-of-1-errors.jsonl").read_text().splitlines()]
    records = [json.loads(line)["id"] for line in (out / "0-of-1-record.jsonl").read_text().splitlines()]
    assert errors == [5, 9]  # the bad items before it are rejected, as bad data; item 17 is in neither file
    assert records == [i for i in range(17) if i not in (5, 9)]  # everything before it is kept
    monkeypatch.undo()  # the fix
    caplog.clear()
    with caplog.at_level("INFO"):
        assert pretok(images_data, out, tiny_bundle, "--num_workers", num_workers) == 0
    assert "resuming at id 17" in caplog.text
    assert rank_files(out) == clean


def _tolerance_data(path: Path, n: int) -> Path:
    """Of every 4 items: one good (text only), one with a missing image, one with a bad role, one non-JSON line."""
    with open(path, "w") as f:
        for i in range(n):
            k = i % 4
            if k == 0:
                f.write(json.dumps({"conversations": conv(f"Say {i}.", f"{i}.")}) + "\n")
            elif k == 1:
                f.write(json.dumps({"conversations": conv("<|image|> ?", "x"), "image": [f"img/gone{i}.png"]}) + "\n")
            elif k == 2:
                f.write(json.dumps({"conversations": [{"from": "robot", "value": "hi"},
                                                      {"from": "gpt", "value": "x"}]}) + "\n")
            else:
                f.write("{not json\n")
    return path


def test_a_run_rejecting_most_items_stops_at_max_error_rate_with_the_three_most_common_reasons(
        tiny_bundle, tmp_path, caplog):
    inp = _tolerance_data(tmp_path / "data.jsonl", 260)
    out = tmp_path / "out"
    assert pretok(inp, out, tiny_bundle, "--num_workers", "0") == 3  # 75 % rejected > 0.5, judged at item 200
    text = caplog.text
    assert "150 of the 200 items of this run were rejected (75%, more than --max_error_rate 0.5)" in text
    assert "50 x [image] image N cannot be used: <path>: no such file" in text
    assert "50 x [conversation] conversations[N]: unknown role 'robot'" in text
    assert "50 x [input] not a JSON line" in text
    assert "Check --image_root" in text and "the input format (--in_format auto: read as jsonl)" in text
    assert not (out / "0-of-1-done.json").exists()
    # nothing of a misconfigured run is kept, its rejections least of all
    assert (out / "0-of-1-errors.jsonl").read_bytes() == b"" and (out / "0-of-1-record.jsonl").read_bytes() == b""
    assert "Nothing of this run was kept" in text and not (out / "0-of-1-discard.json").exists()
    # data this bad on purpose: the re-run with the check off continues and ends as a clean run does
    caplog.clear()
    assert pretok(inp, out, tiny_bundle, "--num_workers", "2", "--max_error_rate", "1") == 0
    ref = tmp_path / "ref"
    assert pretok(inp, ref, tiny_bundle, "--num_workers", "0", "--max_error_rate", "1") == 0
    assert rank_files(out) == rank_files(ref)
    assert len((ref / "0-of-1-errors.jsonl").read_text().splitlines()) == 195


def test_a_wrong_image_root_stops_at_max_consecutive_errors_and_the_fixed_rerun_keeps_nothing_of_it(
        images_data, clean, tiny_bundle, tmp_path, caplog):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pretok(images_data, out, tiny_bundle, "--num_workers", "1", "--image_root", str(empty),
                  "--max_consecutive_errors", "3") == 3
    # items 0 (text only), 1, 2 (images), 3 (text only), 4 (image), 5, 6, 7: 5 to 8 are 4 rejections in a row
    assert "4 items in a row were rejected (more than --max_consecutive_errors 3)" in caplog.text
    assert f"relative image and video paths now resolve against {empty}" in caplog.text
    assert not (out / "0-of-1-done.json").exists()
    assert pretok(images_data, out, tiny_bundle, "--num_workers", "0") == 0  # the right root (the default)
    got = rank_files(out)
    assert b"empty" in got.pop("run.json")  # the first run's paths stay there, for information only
    assert got == {k: v for k, v in clean.items() if k != "run.json"}


def test_the_failure_tolerance_flags_are_in_the_help_and_validated(capsys):
    with pytest.raises(SystemExit):
        PretokArgs.parse(["-h"])
    text = capsys.readouterr().out
    assert "--max_error_rate" in text and "--max_consecutive_errors" in text
    base = ["--in_filename", "x.json", "--out_dir", "o", "--tokenizer_dir", "b"]
    args = PretokArgs.parse(base)
    assert (args.max_error_rate, args.max_consecutive_errors) == (0.5, 100)
    for bad in (["--max_error_rate", "1.5"], ["--max_consecutive_errors", "-1"]):
        with pytest.raises(SystemExit):
            PretokArgs.parse(base + bad)
        assert bad[0] in capsys.readouterr().err

"""The exactly-once rank writer (data/pretok_writer.py): every crash state resumes to identical bytes.

Each test writes a reference rank in one go, then fabricates the files a kill -9 can leave behind (torn
lines, a shard longer than its records, one line file ahead of the other) and checks that resuming
redoes exactly the missing ids and ends byte-identical. No model involved: items are synthetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kill_helper import kill_at_lines

from data.pretok_writer import OutputConflictError, RankWriter, done_name, run_name, scan_outputs
from data.records import ShardReader, errors_name, record_name, shard_name

IDS = range(10, 40)
INFO = {"num_items": 100, "in_format": "json", "target_size": 256, "tokenizer_sha256": "abc"}
FILES = [shard_name(1, 3), record_name(1, 3), errors_name(1, 3), run_name(1, 3), done_name(1, 3)]


def item(i: int):
    """Deterministic synthetic outcome of id i: an error for multiples of 4, else tokens/labels."""
    if i % 4 == 0:
        return None
    n = 3 + i % 5
    tokens = [1000 + i * 10 + k for k in range(n)]
    return tokens, [-100] * 2 + tokens[2:]


def write(out: Path, ids, commit_every: int = 3, stop_after: int | None = None) -> RankWriter:
    w = RankWriter.open(out, 1, 3, IDS, INFO)
    if w.finished:
        w.close()
        return w
    done = 0
    for i in ids:
        if i < w.state.next_id or i in w.state.skip:
            continue
        r = item(i)
        if r is None:
            w.add_error(i, f"item {i}: bad", "conversation")
        else:
            w.add(i, *r)
        done += 1
        if done % commit_every == 0:
            w.commit()
        if stop_after is not None and done >= stop_after:
            w.commit()
            w.close()
            return w
    w.finish()
    w.close()
    return w


def snapshot(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in FILES if (out / f).exists()}


@pytest.fixture
def reference(tmp_path) -> dict[str, bytes]:
    write(tmp_path / "ref", IDS)
    return snapshot(tmp_path / "ref")


def test_reference_rank_has_every_id_once_in_order(reference, tmp_path):
    recs = [json.loads(x) for x in reference[record_name(1, 3)].decode().splitlines()]
    errs = [json.loads(x) for x in reference[errors_name(1, 3)].decode().splitlines()]
    assert sorted(r["id"] for r in recs + errs) == list(IDS)
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)
    reader = ShardReader(tmp_path / "ref" / shard_name(1, 3))
    for r in recs:
        tokens, labels = reader.read(r["offset"], r["len"])
        assert (tokens.tolist(), labels.tolist()) == item(r["id"])
    done = json.loads(reference[done_name(1, 3)])
    assert done["records"] == len(recs) and done["errors"] == len(errs)
    assert done["errors_by_reason"] == {"conversation": len(errs)}


@pytest.mark.parametrize("stop_after", [1, 5, 13, 29])
def test_resume_after_clean_stop_gives_identical_bytes(reference, tmp_path, stop_after):
    out = tmp_path / "run"
    write(out, IDS, stop_after=stop_after)
    assert done_name(1, 3) not in snapshot(out)
    write(out, IDS)
    assert snapshot(out) == reference


def _cut(path: Path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, path.stat().st_size - nbytes))


@pytest.mark.parametrize("torn", ["record", "errors", "both"])
def test_resume_drops_torn_last_line_and_gives_identical_bytes(reference, tmp_path, torn):
    out = tmp_path / "run"
    write(out, IDS, stop_after=17)
    if torn in ("record", "both"):
        _cut(out / record_name(1, 3), 7)
    if torn in ("errors", "both"):
        _cut(out / errors_name(1, 3), 5)
    state = scan_outputs(out, 1, 3, IDS)
    assert state.torn
    write(out, IDS)
    assert snapshot(out) == reference


def test_resume_redoes_ids_missing_from_one_file_of_the_last_commit(reference, tmp_path):
    """A kill after the record lines of a commit were written but before its error lines were: the
    records run ahead of the errors; the missing error ids (now in a gap) are redone, nothing doubles."""
    out = tmp_path / "run"
    write(out, IDS, stop_after=20)
    lines = (out / errors_name(1, 3)).read_bytes().splitlines(keepends=True)
    (out / errors_name(1, 3)).write_bytes(b"".join(lines[:-2]))  # the last commit's errors never landed
    state = scan_outputs(out, 1, 3, IDS)
    missing = [json.loads(x)["id"] for x in lines[-2:]]
    assert state.next_id == missing[0] and state.skip  # records after the gap are kept, not redone
    write(out, IDS)
    assert snapshot(out) == reference


def test_resume_truncates_shard_bytes_written_after_the_last_record(reference, tmp_path):
    out = tmp_path / "run"
    write(out, IDS, stop_after=11)
    with open(out / shard_name(1, 3), "ab") as f:  # appended and even synced, but no record line yet
        f.write(np.arange(9, dtype="<i4").tobytes())
    write(out, IDS)
    assert snapshot(out) == reference


def test_rerun_of_finished_rank_changes_nothing(reference, tmp_path):
    out = tmp_path / "ref"
    before = {f: (out / f).stat().st_mtime_ns for f in FILES}
    w = write(out, IDS)
    assert w.finished
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == before


def test_rerun_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    write(out, IDS, stop_after=3)
    with pytest.raises(OutputConflictError, match="target_size: 256 there, 512 now"):
        RankWriter.open(out, 1, 3, IDS, {**INFO, "target_size": 512})


def test_damaged_middle_line_is_refused_not_guessed(tmp_path):
    out = tmp_path / "run"
    write(out, IDS, stop_after=12)
    p = out / record_name(1, 3)
    lines = p.read_bytes().splitlines(keepends=True)
    lines[1] = b"garbage\n"
    p.write_bytes(b"".join(lines))
    with pytest.raises(OutputConflictError, match="damaged line"):
        scan_outputs(out, 1, 3, IDS)


def test_records_of_another_tool_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / record_name(1, 3)).write_text(json.dumps({"id": 10, "file": "/x/10.pkl", "len": 5}) + "\n")
    with pytest.raises(OutputConflictError, match="another tool"):
        scan_outputs(out, 1, 3, IDS)


def test_second_writer_on_the_same_rank_is_refused(tmp_path):
    out = tmp_path / "run"
    w = RankWriter.open(out, 1, 3, IDS, INFO)
    try:
        code = ("import sys; import data.pretok_writer as pw; from data.pretok_writer import RankWriter, "
                "OutputConflictError\npw.LOCK_WAIT_SECONDS = 0.2\n"
                f"try:\n RankWriter.open({str(out)!r}, 1, 3, range(10, 40), {INFO!r})\n"
                "except OutputConflictError as e:\n print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 3 and "another process is writing rank 1 of 3" in r.stdout
    finally:
        w.close()


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from data.pretok_writer import RankWriter
ids = range(10, 40)
w = RankWriter.open(Path(sys.argv[1]), 1, 3, ids, %r)
if not w.finished:
    for i in w.state.todo(ids.stop):
        time.sleep(float(sys.argv[2]))
        if i %% 4 == 0:
            w.add_error(i, f"item {i}: bad", "conversation")
        else:
            n = 3 + i %% 5
            tokens = [1000 + i * 10 + k for k in range(n)]
            w.add(i, tokens, [-100] * 2 + tokens[2:])
        w.commit()
    w.finish()
w.close()
""" % (INFO,)


def test_kill9_of_writer_process_at_several_points_resumes_identically(reference, tmp_path):
    """A real SIGKILL of a process that commits after every item; then a plain re-run."""
    out = tmp_path / "run"
    rec = out / record_name(1, 3)
    kill_at_lines([sys.executable, "-c", KILL_SCRIPT, str(out), "0.01"], None, rec, (2, 6, 12), timeout=60)
    assert not (out / done_name(1, 3)).exists()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), "0"], check=True, timeout=60)
    assert snapshot(out) == reference


@pytest.mark.parametrize("cut", ["none", "records", "both"])
def test_a_discarded_run_is_cut_back_whatever_the_crash_point_and_resumes_identically(tmp_path, cut):
    """discard_this_run (after too many rejections): its marker is written first, then the files are cut; a
    crash before either cut, between them, or before the marker is removed is finished by the next open."""
    from data.pretok_writer import discard_name

    ref = tmp_path / "ref"
    write(ref, IDS)
    out = tmp_path / "out"
    write(out, IDS, stop_after=8)  # an earlier run did 8 items
    w = RankWriter.open(out, 1, 3, IDS, INFO)  # this run does 9 more, then is discarded
    for i in range(w.state.next_id, w.state.next_id + 9):
        r = item(i)
        w.add_error(i, f"item {i}: bad", "conversation") if r is None else w.add(i, *r)
    w.commit()
    sizes = {"records_bytes": w.state.records_bytes, "errors_bytes": w.state.errors_bytes}
    w.close()
    (out / discard_name(1, 3)).write_text(json.dumps(sizes))  # the marker is on disk: the crash comes after it
    for name, key in ((record_name(1, 3), "records_bytes"), (errors_name(1, 3), "errors_bytes")):
        if cut == "both" or (cut == "records" and key == "records_bytes"):
            with open(out / name, "r+b") as f:
                f.truncate(sizes[key])
    state = RankWriter.open(out, 1, 3, IDS, INFO)
    assert state.state.next_id == IDS.start + 8 and not state.state.skip  # back where this run started
    state.close()
    assert not (out / discard_name(1, 3)).exists()
    write(out, IDS)
    assert {n: (out / n).read_bytes() for n in FILES} == {n: (ref / n).read_bytes() for n in FILES}


def test_discard_this_run_keeps_exactly_what_was_there_at_open(tmp_path):
    out = tmp_path / "out"
    write(out, IDS, stop_after=5)
    before = {n: (out / n).read_bytes() for n in (record_name(1, 3), errors_name(1, 3))}
    w = RankWriter.open(out, 1, 3, IDS, INFO)
    for i in range(w.state.next_id, w.state.next_id + 7):
        r = item(i)
        w.add_error(i, f"item {i}: bad", "conversation") if r is None else w.add(i, *r)
        if i % 2:
            w.commit()
    assert w.discard_this_run() == 7
    w.close()
    assert {n: (out / n).read_bytes() for n in before} == before

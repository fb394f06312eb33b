"""Building the record index by streaming (data/records.py): byte-identical to the whole-file build, clear
errors for malformed record files, and one valid index when several processes open a record file at once."""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

import data.records as records
from data.records import (MAX_NAMES_IN_META, RecordFormatError, build_index, index_dir_for, index_is_current,
                          iter_record_file, open_index)
from tests.dist_helper import spawn


def reference_index(rec: Path) -> dict[str, bytes]:
    """The index as the whole-file build wrote it (json.load, a dict numbering the file names, np.save),
    file name -> bytes: the oracle the streamed build must equal."""
    arr = json.loads(rec.read_text())
    files: dict[str, int] = {}
    cols = {"id": [], "file": [], "offset": [], "len": []}
    for d in arr:
        cols["id"].append(int(d["id"]))
        cols["file"].append(files.setdefault(str(d["file"]), len(files)))
        cols["offset"].append(-1 if d.get("offset") is None else int(d["offset"]))
        cols["len"].append(int(d["len"]))
    st = rec.stat()
    in_meta = len(files) <= MAX_NAMES_IN_META
    out = rec.parent / "reference"
    out.mkdir(exist_ok=True)
    if not in_meta:
        enc = [n.encode("utf-8") for n in files]
        np.save(out / "files.npy", np.array(enc, dtype=f"S{max(map(len, enc))}"), allow_pickle=False)
    for name, dtype in (("id", np.int64), ("file", np.int32), ("offset", np.int64), ("len", np.int32)):
        np.save(out / f"{name}.npy", np.asarray(cols[name], dtype=dtype), allow_pickle=False)
    (out / "meta.json").write_text(json.dumps({
        "format": "lumina-stack-record-index", "version": 1, "count": len(arr), "files": list(files) if in_meta
        else None, "n_files": len(files), "record_size": st.st_size, "record_mtime_ns": st.st_mtime_ns}))
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _shard_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": i, "file": f"{i % 3}-of-3-tokens.bin", "len": rng.randint(1, 4000), "offset": 11 * i}
            for i in range(n)]


def _lumina_records(n: int, seed: int = 1) -> list[dict]:
    """Lumina's one .pkl per item, with names that trip a naive splitter ('}', ',', quotes, non-ASCII) and
    an extra nested key."""
    rng = random.Random(seed)
    return [{"file": f"/data/pkl/{i}}},\"é.pkl", "len": rng.randint(1, 4000), "id": i,
             "meta": {"src": [1, {"k": "}"}]}} for i in range(n)]


CASES = {
    "shard records": (_shard_records(3000), None),
    "Lumina records": (_lumina_records(3000), None),
    "Lumina records, pretty-printed": (_lumina_records(500), 2),
    "records listed twice": (_lumina_records(700) + _shard_records(50) + _lumina_records(700), None),
    "huge elements": ([{"file": f"x{i}" * (20 + i % 60), "len": 1, "id": i} for i in range(400)], 1),
    "empty": ([], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_build_is_byte_identical_to_the_whole_file_build(case, tmp_path, monkeypatch):
    items, indent = CASES[case]
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(items, indent=indent, ensure_ascii=False))
    want = reference_index(rec)
    # small chunks and a small name dict: every chunk boundary, slow-path and spill case is exercised
    monkeypatch.setattr(records, "JSON_CHUNK_BYTES", 333)
    monkeypatch.setattr(records, "INDEX_CHUNK", 97)
    monkeypatch.setattr(records, "MAX_NAMES_IN_DICT", 40)
    build_index(rec)
    got = {p.name: p.read_bytes() for p in index_dir_for(rec).iterdir()}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    assert [r.id for r in iter_record_file(rec)] == [int(d["id"]) for d in items]


def test_a_jsonl_record_file_and_a_records_iterable_build_the_same_index(tmp_path):
    items = _shard_records(500)
    (tmp_path / "a.json").write_text(json.dumps(items))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    build_index(tmp_path / "a.json")
    build_index(tmp_path / "b.jsonl")
    a, b = open_index(tmp_path / "a.json"), open_index(tmp_path / "b.jsonl")
    for col in ("id", "file", "offset", "len"):
        assert np.array_equal(getattr(a, col), getattr(b, col))


@pytest.mark.parametrize("text, words", [
    ('[{"id": 0, "file": "a", "len": 1}, {"id": 1, "file": "a", "len": 2}', "ends early"),
    ('[{"id": 0, "file": "a", "len": 1} {"id": 1, "file": "a", "len": 2}]', "expected ',' or ']'"),
    ('[{"id": 0, "file": "a", "len": 1}, {"id": 1, "file": "a" "len": 2}]', "Expecting ',' delimiter"),
    ('{"id": 0, "file": "a", "len": 1}', "does not start with '['"),
    ('[{"id": 0, "file": "a", "len": 1}] trailing', "after the closing ']'"),
])
def test_malformed_record_json_gives_a_clear_error_naming_the_file(text, words, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "JSON_CHUNK_BYTES", 16)
    rec = tmp_path / "record.json"
    rec.write_text(text)
    with pytest.raises(RecordFormatError, match="record.json") as e:
        open_index(rec)
    assert words in str(e.value)
    assert not index_dir_for(rec).exists() and not list(tmp_path.glob("*.tmp*"))


def test_a_bad_record_in_a_later_chunk_names_its_position(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "JSON_CHUNK_BYTES", 100)
    items = _shard_records(50)
    del items[37]["len"]
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(items))
    with pytest.raises(RecordFormatError, match=r"record.json\[37\].*needs integer 'id' and 'len'"):
        build_index(rec)


def _open_concurrently(rank: int, rec: str) -> None:
    idx = open_index(rec)
    assert len(idx) == 5000 and idx.record(4999).file.endswith("4999},\"é.pkl")


def test_processes_opening_a_record_file_at_once_build_one_valid_index(tmp_path):
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(_lumina_records(5000)))
    want = reference_index(rec)
    spawn(functools.partial(_open_concurrently, rec=str(rec)), 3, timeout=120)
    got = {p.name: p.read_bytes() for p in index_dir_for(rec).iterdir()}
    assert got == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "record.json.index",
                                                         "record.json.index.lock", "reference"]


def _open_while_counting_builds(rank: int, rec: str, log: str) -> None:
    """Rank 0 opens first and holds its build open for a while; rank 1 opens once rank 0 is building. Every
    build, and when each open returned, is appended to ``log``."""
    import logging
    import time

    def note(line: str) -> None:
        with open(log, "a") as f:
            f.write(f"{line}\n")

    real = records.build_index

    def counted_build(path, *args, **kw):
        note(f"build-start {rank} {time.time()}")
        if rank == 0:
            Path(log + ".building").touch()
            time.sleep(1.5)  # long enough for rank 1 to find no index and reach the lock
        out = real(path, *args, **kw)
        note(f"build-end {rank} {time.time()}")
        return out

    records.build_index = counted_build  # ensure_index calls it through the module
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())
    records.logger.addHandler(handler)
    records.logger.setLevel(logging.INFO)
    if rank == 1:
        deadline = time.time() + 60
        while not Path(log + ".building").exists():
            assert time.time() < deadline, "rank 0 never started building"
            time.sleep(0.01)
    idx = open_index(rec)
    assert len(idx) == 50
    waited = any(m.startswith("waiting for another process") for m in messages)
    note(f"opened {rank} {time.time()} waited={waited}")


def test_two_concurrent_openers_build_the_index_once_and_the_second_waits_for_it(tmp_path):
    """The flock around the build: rank 1 finds no index while rank 0 is building it, waits on the lock
    (not building a second copy), and returns only after rank 0's build has ended, using that index."""
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(_lumina_records(50)))
    log = tmp_path / "log.txt"
    spawn(functools.partial(_open_while_counting_builds, rec=str(rec), log=str(log)), 2, timeout=120)
    lines = [line.split() for line in log.read_text().splitlines()]
    builds = [w for w in lines if w[0] == "build-start"]
    assert [w[1] for w in builds] == ["0"], lines  # one build, by the first opener
    build_end = next(float(w[2]) for w in lines if w[0] == "build-end")
    opened = {w[1]: (float(w[2]), w[3]) for w in lines if w[0] == "opened"}
    assert opened["1"][1] == "waited=True" and opened["0"][1] == "waited=False", lines
    assert opened["1"][0] >= build_end, lines  # the second opener returned after the build, not before
    assert {p.name: p.read_bytes() for p in index_dir_for(rec).iterdir()} == reference_index(rec)


def _build_without_lock(rank: int, rec: str) -> None:
    build_index(rec)  # no lock: both build, one installs, the other keeps it
    assert index_is_current(rec) and len(open_index(rec)) == 5000


def test_two_builders_without_a_lock_leave_one_valid_index_and_no_debris(tmp_path):
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(_lumina_records(5000)))
    want = reference_index(rec)
    spawn(functools.partial(_build_without_lock, rec=str(rec)), 2, timeout=120)
    assert {p.name: p.read_bytes() for p in index_dir_for(rec).iterdir()} == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "record.json.index", "reference"]


def test_a_stale_index_is_replaced(tmp_path):
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(_shard_records(10)))
    assert len(open_index(rec)) == 10
    rec.write_text(json.dumps(_shard_records(12)))
    os.utime(rec, ns=(1, 1))
    assert len(open_index(rec)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "record.json.index",
                                                         "record.json.index.lock"]


@pytest.mark.parametrize("fake_hash", [lambda s: 7, len])
def test_names_sharing_a_hash_are_never_merged(fake_hash, tmp_path, monkeypatch):
    items = _lumina_records(300) + _lumina_records(300)[::3]  # repeats, so equal hashes must be checked
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps(items))
    want = reference_index(rec)
    monkeypatch.setattr(records, "MAX_NAMES_IN_DICT", 20)
    monkeypatch.setattr(records, "hash", fake_hash, raising=False)  # every name (or length) collides
    build_index(rec)
    assert {p.name: p.read_bytes() for p in index_dir_for(rec).iterdir()} == want

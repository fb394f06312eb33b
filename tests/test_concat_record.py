"""pre_tokenize/concat_record.py: one JSON array + index from finished ranks; refuses an incomplete set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.pretok_writer import RankWriter
from data.records import ShardReader, open_index
from pre_tokenize.concat_record import main

REPO = Path(__file__).resolve().parents[1]
N, S = 11, 3


def tokens_of(i: int) -> list[int]:
    return [5000 + i] * (2 + i % 3)


def make_rank(out: Path, r: int, s: int = S, n: int = N, finish: bool = True, stop_after: int | None = None) -> None:
    from data.inputs.item import rank_range

    ids = rank_range(n, r, s)
    w = RankWriter.open(out, r, s, ids, {"num_items": n, "in_format": "json", "target_size": 256,
                                          "tokenizer_sha256": "x"})
    for k, i in enumerate(ids):
        if stop_after is not None and k >= stop_after:
            break
        if i == 4:
            w.add_error(i, "data.json item 4: image 0 cannot be used: x.png: no such file", "image")
        else:
            w.add(i, tokens_of(i), tokens_of(i))
    w.commit()
    if finish and stop_after is None:
        w.finish()
    w.close()


def test_concat_writes_one_array_with_unique_ids_files_relative_to_it_and_an_index(tmp_path):
    out = tmp_path / "out"
    for r in range(S):
        make_rank(out, r)
    save = tmp_path / "merged" / "record.json"
    assert main(["--sub_record_dir", str(out), "--save_path", str(save)]) == 0
    arr = json.loads(save.read_text())
    assert [d["id"] for d in arr] == [i for i in range(N) if i != 4]
    assert arr[0]["file"] == "../out/0-of-3-tokens.bin"
    for d in arr:
        tokens, labels = ShardReader(save.parent / d["file"]).read(d["offset"], d["len"])
        assert tokens.tolist() == tokens_of(d["id"])
    index = open_index(save, build_if_missing=False)  # written by concat, current
    assert len(index) == N - 1 and index.id.tolist() == [d["id"] for d in arr]
    assert not list(save.parent.glob(".*tmp*"))


def test_concat_refuses_a_missing_or_unfinished_rank_and_writes_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    make_rank(out, 0)
    make_rank(out, 2, stop_after=2)  # killed mid-run: no done marker; rank 1 never ran
    save = tmp_path / "record.json"
    assert main(["--sub_record_dir", str(out), "--save_path", str(save)]) == 1
    assert "missing ranks (no record file) of 3: 1" in caplog.text
    assert "unfinished ranks of 3" in caplog.text and "--allow_incomplete" in caplog.text
    assert not save.exists() and not Path(str(save) + ".index").exists()


def test_concat_allow_incomplete_merges_what_is_there_skipping_a_torn_line(tmp_path):
    out = tmp_path / "out"
    make_rank(out, 0)
    make_rank(out, 2, stop_after=3)
    with open(out / "2-of-3-record.jsonl", "ab") as f:
        f.write(b'{"id": 11, "fi')  # a line being written when we looked
    save = tmp_path / "record.json"
    assert main(["--sub_record_dir", str(out), "--save_path", str(save), "--allow_incomplete"]) == 0
    assert [d["id"] for d in json.loads(save.read_text())] == [0, 1, 2, 3, 8, 9, 10]


def test_concat_refuses_mixed_splits_and_duplicate_ids(tmp_path, caplog):
    out = tmp_path / "out"
    for r in range(S):
        make_rank(out, r)
    make_rank(out, 0, s=1)
    assert main(["--sub_record_dir", str(out), "--save_path", str(tmp_path / "r.json")]) == 1
    assert "different --splits (1, 3)" in caplog.text
    dup = tmp_path / "dup"
    make_rank(dup, 0, s=2, n=4)
    make_rank(dup, 1, s=2, n=4)
    lines = (dup / "1-of-2-record.jsonl").read_text().splitlines()
    (dup / "1-of-2-record.jsonl").write_text("\n".join(lines + [lines[0].replace('"id": 2', '"id": 0')]) + "\n")
    assert main(["--sub_record_dir", str(dup), "--save_path", str(tmp_path / "d.json")]) == 1
    assert "ids are not unique" in caplog.text and not (tmp_path / "d.json").exists()


def test_concat_reads_lumina_records_with_pickle_files_and_progress_markers(tmp_path):
    out = tmp_path / "lumina"
    out.mkdir()
    (out / "0-of-1-record.jsonl").write_text(json.dumps({"file": "/data/files/0.pkl", "len": 5, "id": 0}) + "\n")
    (out / "0-of-1-progress.txt").write_text("finished")
    save = tmp_path / "record.json"
    assert main(["--sub_record_dir", str(out), "--save_path", str(save)]) == 0
    assert json.loads(save.read_text()) == [{"id": 0, "file": "/data/files/0.pkl", "len": 5}]


def test_concat_script_runs_from_the_repo_root_and_has_help():
    r = subprocess.run([sys.executable, "pre_tokenize/concat_record.py", "-h"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--sub_record_dir", "--save_path", "--allow_incomplete"):
        assert flag in r.stdout


@pytest.mark.parametrize("missing", ["dir", "records"])
def test_concat_of_a_directory_without_records_says_so(tmp_path, caplog, missing):
    d = tmp_path / "nothing"
    if missing == "records":
        d.mkdir()
    assert main(["--sub_record_dir", str(d), "--save_path", str(tmp_path / "r.json")]) == 1
    assert ("not a directory" if missing == "dir" else "no {r}-of-{S}-record.jsonl files") in caplog.text

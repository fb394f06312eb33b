"""Input readers of pre-tokenization (data/inputs/): ids, ranges, bad files, bad items, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tar_helper import write_tar

import data.inputs.json_files as inf
from data.inputs.dispatch import open_input
from data.inputs.item import InputFileError, rank_range


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_rank_ranges_are_contiguous_ceil_splits_covering_every_id_once():
    for n in (0, 1, 7, 10, 11):
        for s in (1, 2, 3, 8):
            rs = [rank_range(n, r, s) for r in range(s)]
            assert [i for r in rs for i in r] == list(range(n))
            per = -(-n // s)
            assert all(r.start == min(k * per, n) for k, r in enumerate(rs))
    with pytest.raises(ValueError, match="rank 3 is not in"):
        rank_range(10, 3, 3)


def test_jsonl_ids_skip_blank_lines_and_bad_lines_name_their_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"conversations": conv("a", "b")}) + "\n\n   \n"
                 + "{not json\n" + json.dumps([1, 2]) + "\n" + json.dumps({"conversations": conv("c", "d")}))
    src = open_input(p)
    assert src.format == "jsonl" and len(src) == 4
    items = list(src.iter_items(range(4)))
    assert [it.id for it in items] == [0, 1, 2, 3]
    assert items[0].item["conversations"][0]["value"] == "a" and items[0].error is None
    assert items[1].error.startswith("d.jsonl line 4: not a JSON line") and "{not json" in items[1].error
    assert items[2].error.startswith("d.jsonl line 5: expected a JSON object") and "list" in items[2].error
    assert items[3].item["conversations"][1]["value"] == "d" and items[3].where == "d.jsonl line 6"
    assert [it.id for it in src.iter_items(range(2, 4))] == [2, 3]


def test_jsonl_seeks_to_a_range_through_sparse_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(inf, "JSONL_CHECKPOINT_EVERY", 7)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"conversations": conv(f"q{i}", "a")}) + ("\n\n" if i % 5 == 0 else "\n")
                         for i in range(50)))
    src = open_input(p)
    assert len(src._checkpoints) == 8
    for r in (range(0, 3), range(13, 29), range(48, 50), range(7, 8)):
        got = [(it.id, it.item["conversations"][0]["value"]) for it in src.iter_items(r)]
        assert got == [(i, f"q{i}") for i in r]


MEMORY_SCRIPT = """
import resource, sys
from data.inputs.dispatch import open_input
from data.inputs.item import rank_range
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
src = open_input(sys.argv[1])
n = sum(1 for _ in src.iter_items(rank_range(len(src), 7, 8)))
print(len(src), n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_jsonl_of_a_million_lines_is_counted_and_read_in_bounded_memory(tmp_path):
    """The whole file is ~60 MB; counting it and reading the last rank's 125k items must not hold it."""
    p = tmp_path / "big.jsonl"
    line = (json.dumps({"conversations": conv("hi", "yo")}) + "\n").encode()
    with open(p, "wb") as f:
        for _ in range(100):
            f.write(line * 10_000)
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(p)], capture_output=True, text=True,
                       timeout=120, check=True)
    count, n, grew_kib = map(int, r.stdout.split())
    assert (count, n) == (1_000_000, 125_000)
    assert grew_kib < 16 * 1024, f"peak RSS grew by {grew_kib} KiB reading a {p.stat().st_size}-byte file"


def test_jsonl_whose_first_lines_are_not_json_is_a_bad_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\x89PNG garbage\nmore garbage\n")
    with pytest.raises(InputFileError, match="not a JSONL file"):
        open_input(p)


@pytest.mark.parametrize("content,match", [(None, "file not found"), ("{'a': 1", "not a JSON file"),
                                           ('{"conversations": []}', "expected a JSON list")])
def test_bad_json_input_file_fails_at_once_with_a_clear_message(tmp_path, content, match):
    p = tmp_path / "in.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(InputFileError, match=match) as e:
        open_input(p)
    assert str(p) in str(e.value)


def test_unknown_extension_and_missing_file_are_bad_files(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        open_input(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("[]")
    with pytest.raises(InputFileError, match="pass --in_format"):
        open_input(tmp_path / "data.txt")
    assert open_input(tmp_path / "data.txt", "json").format == "json"


def test_json_list_item_that_is_not_an_object_is_an_item_error(tmp_path):
    p = tmp_path / "in.json"
    p.write_text(json.dumps([{"conversations": conv("a", "b")}, "oops"]))
    items = list(open_input(p).iter_items(range(2)))
    assert items[0].error is None and items[1].error == 'in.json item 1: expected a JSON object with ' \
                                                        '"conversations", got a str'


def test_llava_json_is_detected_and_its_image_markers_converted(tmp_path):
    p = tmp_path / "llava.json"
    p.write_text(json.dumps([{"id": "000001", "image": "coco/1.jpg",
                              "conversations": conv("<image>\nWhat is it?", "A cat.")},
                             {"id": "x", "conversations": conv("text only", "ok")}]))
    src = open_input(p)
    assert src.format == "llava"
    it = next(iter(src.iter_items(range(1))))
    assert it.item["conversations"][0]["value"] == "<|image|>\nWhat is it?"
    assert it.item["image"] == "coco/1.jpg" and it.item["id"] == "000001"
    lumina = tmp_path / "lumina.json"
    lumina.write_text(json.dumps([{"conversations": conv("<|image|> and a literal <image> tag", "x"),
                                   "image": ["a.png"]}]))
    src = open_input(lumina)
    assert src.format == "json"
    assert next(iter(src.iter_items(range(1)))).item["conversations"][0]["value"].endswith("<image> tag")




def test_webdataset_samples_group_by_key_in_shard_name_order(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    q = lambda s: json.dumps({"question": s}).encode()  # noqa: E731
    write_tar(d / "shard-001.tar", [("c/0003.jpg", b"JPG3"), ("c/0003.json", q("q3")), ("c/0003.txt", b"a3\n"),
                               ("c/0004.json", q("q4")), ("c/0004.txt", b"a4")])  # 0004 has no image
    write_tar(d / "shard-000.tar", [("0001.png", b"PNG1"), ("0001.json", q("q1")), ("0001.txt", b"a1"),
                               ("0002.webp", b"WEBP"), ("0002.json", b"not json"), ("0002.txt", b"a2")])
    (d / "notes.md").write_text("ignored")
    src = open_input(d)
    assert src.format == "wds" and len(src) == 4
    items = list(src.iter_items(range(4)))
    assert items[0].item == {"conversations": conv("q1", "a1"), "image": [b"PNG1"]}
    assert items[0].where == "shard-000.tar sample 0001"
    assert "0002.json is not JSON" in items[1].error
    assert items[2].item == {"conversations": conv("q3", "a3"), "image": [b"JPG3"]}
    assert "no image member" in items[3].error and "shard-001.tar sample c/0004" in items[3].error
    assert [it.id for it in src.iter_items(range(1, 3))] == [1, 2]  # a range that crosses shards


def test_webdataset_directory_without_shards_or_with_a_broken_shard_is_a_bad_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no webdataset .tar shards"):
        open_input(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(InputFileError, match="0.tar"):
        open_input(tmp_path / "bad")

"""--in_format energon: datasets prepared by Megatron-Energon (``energon prepare``, run here in-process, and
the documented .nv-meta layout written by hand for the older format), ids, splits, excludes, refusals."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tar_helper import write_tar

from data.inputs.energon import EnergonSource
from data.inputs.dispatch import open_input
from data.inputs.item import InputFileError
from data.records import ShardReader, iter_record_file
from pre_tokenize.pre_tokenize import PretokArgs, main, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def jpg(seed: int, w: int = 48, h: int = 32) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "JPEG")
    return b.getvalue()


def llava_jp_shards(d: Path, shards: int = 2, per: int = 3) -> Path:
    """Tar shards as LLaVA-JP writes them: {idx}.jpg, {idx}.json {"question"}, {idx}.txt answer."""
    d.mkdir(parents=True, exist_ok=True)
    for t in range(shards):
        members = []
        for k in range(per):
            key = f"{t * per + k:06d}"
            members += [(f"{key}.jpg", jpg(t * per + k)),
                        (f"{key}.json", json.dumps({"question": f"Q {key}: what is this?", "id": key}).encode()),
                        (f"{key}.txt", f"Noise {key}.\n".encode())]
        write_tar(d / f"{t:06d}.tar", members)
    return d


def energon_prepare(d: Path, *args: str) -> None:
    """energon's own `energon prepare` command, in this process, non-interactive."""
    from megatron.energon.tools.prepare import command

    command.main([str(d), "--non-interactive", "--num-workers", "1", "--no-progress", *args], standalone_mode=False)


VQA_MAP = '{"image": "jpg", "context": "json[question]", "answers": "txt"}'


def write_meta(d: Path, dataset_yaml: str, splits: dict, counts: dict, exclude=(), info_yaml: bool = False) -> Path:
    """The .nv-meta files in energon's documented layout (for what `energon prepare` no longer writes)."""
    meta = d / ".nv-meta"
    meta.mkdir(exist_ok=True)
    (meta / "dataset.yaml").write_text(dataset_yaml)
    (meta / "split.yaml").write_text("split_parts:\n" + "".join(
        f"  {k}:\n" + "".join(f"  - {s}\n" for s in v) if v else f"  {k}: []\n" for k, v in splits.items())
        + ("exclude:\n" + "".join(f"- {x}\n" for x in exclude) if exclude else "exclude: []\n"))
    if info_yaml:
        (meta / ".info.yaml").write_text("shard_counts:\n" + "".join(f"  {k}: {v}\n" for k, v in counts.items()))
    else:
        (meta / ".info.json").write_text(json.dumps({"energon_version": "7.4.1", "shard_counts": counts}))
    return d


def pretok(path: Path, out: Path, bundle: Path, *extra: str) -> dict:
    return run(PretokArgs.parse(["--in_filename", str(path), "--out_dir", str(out), "--tokenizer_dir", str(bundle),
                                 "--target_size", "64", "--no_progress", "--num_workers", "0", *extra]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    d = llava_jp_shards(tmp_path_factory.mktemp("energon") / "energon")
    energon_prepare(d, "--split-ratio", "1,0,0", "--sample-type", "VQASample", "--field-map", VQA_MAP)
    assert (d / ".nv-meta" / "dataset.yaml").exists() and (d / ".nv-meta" / "split.yaml").exists()
    return d


def test_a_dataset_prepared_by_energon_tokenizes_like_the_same_tars_as_webdataset(prepared, tiny_bundle, tmp_path):
    summary = pretok(prepared, tmp_path / "e", tiny_bundle)  # auto: .nv-meta/ -> energon
    pretok(prepared, tmp_path / "w", tiny_bundle, "--in_format", "wds")
    assert summary["records"] == 6 and summary["errors"] == 0
    assert json.loads((tmp_path / "e" / "0-of-1-run.json").read_text())["in_format"] == "energon"
    for name in ("tokens.bin", "record.jsonl"):
        assert (tmp_path / "e" / f"0-of-1-{name}").read_bytes() == (tmp_path / "w" / f"0-of-1-{name}").read_bytes()


def test_ids_are_tar_order_then_sample_order_and_two_ranks_cover_each_once(prepared, tiny_bundle, tmp_path):
    src = open_input(prepared)
    assert isinstance(src, EnergonSource) and len(src) == 6
    items = list(src.iter_items(range(6)))
    assert [it.where for it in items] == [f"{t:06d}.tar sample {k:06d}" for t, k in
                                          ((0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5))]
    assert items[4].item["conversations"] == [{"from": "human", "value": "Q 000004: what is this?"},
                                              {"from": "gpt", "value": "Noise 000004."}]
    assert [it.id for it in src.iter_items(range(2, 5))] == [2, 3, 4]
    pretok(prepared, tmp_path / "one", tiny_bundle)
    for r in range(2):
        pretok(prepared, tmp_path / "two", tiny_bundle, "--splits", "2", "--rank", str(r))
    one = ShardReader(tmp_path / "one" / "0-of-1-tokens.bin")
    want = {x.id: [a.tobytes() for a in one.read(x.offset, x.len)]
            for x in iter_record_file(tmp_path / "one" / "0-of-1-record.jsonl")}
    got = {}
    for r in range(2):
        reader = ShardReader(tmp_path / "two" / f"{r}-of-2-tokens.bin")
        for x in iter_record_file(tmp_path / "two" / f"{r}-of-2-record.jsonl"):
            assert x.id not in got
            got[x.id] = [a.tobytes() for a in reader.read(x.offset, x.len)]
    assert got == want and sorted(got) == list(range(6))


def test_older_captioning_webdataset_with_info_yaml_splits_and_excludes(tmp_path, tiny_bundle):
    d = tmp_path / "cap"
    d.mkdir()
    for t in range(3):
        write_tar(d / f"s{t}.tar", [m for k in range(2) for m in ((f"c{t}{k}.png", jpg(10 * t + k)),
                                                                  (f"c{t}{k}.txt", f"Caption {t}{k}".encode()))])
    write_meta(d, "__module__: megatron.energon\n__class__: CaptioningWebdataset\n"
                  "field_map:\n  image: jpg,png\n  caption: txt\n",
               {"train": ["s{0..1}.tar"], "val": ["s2.tar"]}, {"s0.tar": 2, "s1.tar": 2, "s2.tar": 2},
               exclude=["s0.tar/c01"], info_yaml=True)
    src = open_input(d)
    assert len(src) == 3
    items = list(src.iter_items(range(3)))
    assert [it.where for it in items] == ["s0.tar sample c00", "s1.tar sample c10", "s1.tar sample c11"]
    assert items[0].item["conversations"] == [{"from": "human", "value": "<|image|>"},
                                              {"from": "gpt", "value": "Caption 00"}]
    assert [it.where for it in open_input(d, energon_split="val").iter_items(range(2))] == \
        ["s2.tar sample c20", "s2.tar sample c21"]
    assert pretok(d, tmp_path / "o", tiny_bundle, "--energon_split", "val")["records"] == 2
    assert json.loads((tmp_path / "o" / "0-of-1-run.json").read_text())["energon_split"] == "val"
    with pytest.raises(InputFileError, match="--energon_split 'test': not a split"):
        open_input(d, energon_split="test")


def test_bad_samples_are_rejected_with_their_reason_and_the_run_goes_on(tmp_path, tiny_bundle):
    d = tmp_path / "bad"
    d.mkdir()
    q = lambda k: (f"{k}.json", json.dumps({"question": f"Question {k}?"}).encode())  # noqa: E731
    write_tar(d / "a.tar", [("g0.jpg", jpg(0)), q("g0"), ("g0.txt", b"Good."),
                            q("noimg"), ("noimg.txt", b"x"),
                            ("noq.jpg", jpg(1)), ("noq.json", b'{"other": 1}'), ("noq.txt", b"x"),
                            ("corrupt.jpg", b"\xff\xd8 not really"), q("corrupt"), ("corrupt.txt", b"x"),
                            ("latin.jpg", jpg(2)), q("latin"), ("latin.txt", b"caf\xe9"),
                            ("notjson.jpg", jpg(3)), ("notjson.json", b"{nope"), ("notjson.txt", b"x"),
                            ("g1.jpg", jpg(4)), q("g1"), ("g1.txt", b"Good too.")])
    write_meta(d, "sample_type:\n  __module__: megatron.energon\n  __class__: VQASample\n"
                  "field_map:\n  image: jpg\n  context: json[question]\n  answers: txt\n",
               {"train": ["a.tar"]}, {"a.tar": 7})
    summary = pretok(d, tmp_path / "o", tiny_bundle, "--num_workers", "1")
    errors = {e["id"]: e for e in map(json.loads, (tmp_path / "o" / "0-of-1-errors.jsonl").read_text().splitlines())}
    assert summary["records"] == 2 and sorted(errors) == [1, 2, 3, 4, 5]
    expect = {1: ("input", "a.tar sample noimg: field 'image' (jpg) not found"),
              2: ("input", "a.tar sample noq: field 'context' (json[question]) not found"),
              3: ("image", "a.tar sample corrupt: image 0 cannot be used"),
              4: ("input", "a.tar sample latin: field 'answers' (txt) cannot be decoded"),
              5: ("input", "a.tar sample notjson: field 'context' (json[question]) cannot be decoded")}
    for i, (reason, phrase) in expect.items():
        assert errors[i]["reason"] == reason and errors[i]["error"].startswith(phrase), errors[i]


@pytest.mark.parametrize("dataset_yaml,phrase", [
    ("sample_type:\n  __module__: megatron.energon\n  __class__: ImageClassificationSample\nfield_map:\n"
     "  image: jpg\n", "sample type 'ImageClassificationSample' is not supported"),
    ("__module__: megatron.energon\n__class__: CrudeWebdataset\n", "sample type 'CrudeWebdataset' is not supported"),
    ("sample_type:\n  __module__: megatron.energon\n  __class__: VQASample\nsample_loader: sample_loader.py:sample_loader\n"
     "part_filter: sample_loader.py:part_filter\n", "uses a sample_loader (Python code)"),
    ("sample_type:\n  __module__: megatron.energon\n  __class__: VQASample\nfield_map:\n  image: jpg\n",
     "has no context, answers"),
    (None, "dataset.yaml is missing"),
])
def test_unsupported_dataset_yaml_is_refused_at_open_naming_the_problem(tmp_path, dataset_yaml, phrase):
    d = llava_jp_shards(tmp_path / "d", shards=1)
    write_meta(d, dataset_yaml or "", {"train": ["000000.tar"]}, {"000000.tar": 3})
    if dataset_yaml is None:
        (d / ".nv-meta" / "dataset.yaml").unlink()
    with pytest.raises(InputFileError, match=phrase.replace("(", "\\(").replace(")", "\\)")):
        open_input(d)


def test_a_shard_that_changed_after_prepare_or_missing_metadata_stops_the_run_clearly(prepared, tmp_path,
                                                                                     tiny_bundle, caplog):
    d = llava_jp_shards(tmp_path / "d", shards=1)
    write_meta(d, (prepared / ".nv-meta" / "dataset.yaml").read_text(), {"train": ["000000.tar"]},
               {"000000.tar": 4})
    with pytest.raises(InputFileError, match="shard 000000.tar has only 3 samples, but .nv-meta/.info.json counts 4"):
        list(open_input(d).iter_items(range(4)))
    (d / ".nv-meta" / ".info.json").unlink()
    assert main(["--in_filename", str(d), "--out_dir", str(tmp_path / "o"), "--tokenizer_dir", str(tiny_bundle),
                 "--no_progress"]) == 2
    assert "cannot read the energon metadata in .nv-meta/" in caplog.text
    with pytest.raises(InputFileError, match="no .nv-meta/ directory"):
        open_input(tmp_path, in_format="energon")


def test_missing_megatron_energon_names_the_extra_to_install(prepared, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.energon.epathlib", None)
    with pytest.raises(InputFileError, match=r"pip install -e \.\[energon\]"):
        open_input(prepared)

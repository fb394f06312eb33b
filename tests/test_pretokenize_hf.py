"""--in_format parquet and hf: data written by the real ``datasets`` library (Image features, to_parquet in the
Hub layout, save_to_disk of a Dataset and of a DatasetDict with two splits) pre-tokenizes to exactly the tokens
and labels of the same conversations written as Lumina JSON with image files; ranks, resume, kill -9, errors."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from kill_helper import kill_at_lines

datasets = pytest.importorskip("datasets", reason="tests write data with the datasets package "
                                                  "(requirements-extras.txt)")

from data.inputs.arrow_tables import Columns, HfDiskSource, ParquetSource, row_to_item  # noqa: E402
from data.inputs.dispatch import open_input  # noqa: E402
from data.inputs.item import InputFileError  # noqa: E402
from data.records import ShardReader, iter_record_file  # noqa: E402
from pre_tokenize.pre_tokenize import PretokArgs, main, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
FILES = ("tokens.bin", "record.jsonl", "errors.jsonl", "run.json", "done.json")
NOT_AN_IMAGE = b"these bytes are not an image"

# (conversation with LLaVA/Lumina markers as a user would store it, image names): the train split
TRAIN = [
    (["<image>\nWhat is it?", "Noise."], ["a"]),
    (["Hi there.", "Hello."], []),                                               # text only
    (["<image> or <|image|>: which is wider?", "The first one."], ["a", "b"]),   # two images, both markers
    (["<image> Describe it.", "Noise.", "Which colour?", "Grey, mostly."], ["c"]),  # multi-turn
    (["What is this?", "Nothing."], ["bad"]),                                   # bytes that are not an image
    (["Draw some noise.", "<|image|>"], ["b"]),                                 # image in the answer
    (["No marker here.", "Then it goes first."], ["c"]),                         # marker prepended
    (["<image> Two turns, <image> two images?", "Yes.", "Sure?", "Quite."], ["b", "c"]),
]
# the test split: messages (role/content) with one image; a system turn is refused
TEST = [
    ([("user", "<image>What now?"), ("assistant", "Still noise.")], "a"),
    ([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")], None),
    ([("user", "Only text."), ("assistant", "Fine.")], None),
]


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


def to_lumina(text: str) -> str:
    return text.replace("<image>", "<|image|>")


def pretok(path, out: Path, bundle: Path, *extra: str) -> dict:
    return run(PretokArgs.parse(["--in_filename", str(path), "--out_dir", str(out), "--tokenizer_dir", str(bundle),
                                 "--target_size", "64", "--no_progress", "--num_workers", "0", *extra]))


def rank_files(out: Path, r: int = 0, s: int = 1) -> dict[str, bytes]:
    return {n: (out / f"{r}-of-{s}-{n}").read_bytes() for n in FILES}


def errors(out: Path, r: int = 0, s: int = 1) -> dict[int, dict]:
    return {e["id"]: e for e in map(json.loads, (out / f"{r}-of-{s}-errors.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """The same data as datasets writes it (parquet shards, save_to_disk folders) and as Lumina JSON."""
    d = tmp_path_factory.mktemp("hf")
    img = d / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (48, 32), "b": (32, 48), "c": (40, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img / f"{name}.png")
    (img / "bad.png").write_bytes(NOT_AN_IMAGE)
    raw = {n: (img / f"{n}.png").read_bytes() for n in ("a", "b", "c", "bad")}

    features = datasets.Features({
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "images": datasets.List(datasets.Image())})
    train = datasets.Dataset.from_list(
        [{"conversations": conv(*turns), "images": [{"bytes": raw[n], "path": None} for n in names]}
         for turns, names in TRAIN], features=features)
    test = datasets.Dataset.from_list(
        [{"messages": [{"role": r, "content": c} for r, c in turns],
          "image": None if name is None else f"{name}.png"} for turns, name in TEST],  # a path: kept as a path
        features=datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                                "content": datasets.Value("string")}),
                                    "image": datasets.Image()}))
    # The Hub layout: data/{split}-NNNNN-of-NNNNN.parquet, train in two shards of small row groups.
    hub = d / "hub"
    (hub / "data").mkdir(parents=True)
    for k in range(2):
        train.shard(2, k, contiguous=True).to_parquet(str(hub / "data" / f"train-{k:05d}-of-00002.parquet"),
                                                      batch_size=3)
    cwd = os.getcwd()
    os.chdir(img)  # datasets reads the test split's relative image paths from the working directory
    try:
        test.to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))  # keeps the path
        datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(d / "dict"),  # embeds the bytes
                                                                           num_shards={"train": 2, "test": 1})
    finally:
        os.chdir(cwd)
    train.save_to_disk(str(d / "one"))

    json_path = d / "train.json"
    json_path.write_text(json.dumps(
        [{"conversations": conv(*map(to_lumina, turns)), **({"image": [f"img/{n}.png" for n in names]} if names else {})}
         for turns, names in TRAIN]))
    return {"dir": d, "hub": hub, "dict": d / "dict", "one": d / "one", "json": json_path, "img": img}


@pytest.fixture(scope="module")
def json_reference(hf, tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("json_ref")
    pretok(hf["json"], out, tiny_bundle)
    return out


def test_what_datasets_writes_is_found_and_read_row_by_row(hf):
    assert isinstance(open_input(hf["hub"]), ParquetSource)       # auto: a directory of parquet files
    assert open_input(hf["hub"] / "data" / "train-00001-of-00002.parquet").format == "parquet"
    glob_src = open_input(str(hf["hub"] / "data" / "train-*.parquet"))                   # a glob
    assert len(glob_src) == len(TRAIN) and glob_src.base_dir == hf["hub"] / "data"
    src = open_input(hf["dict"])                                  # auto: dataset_dict.json -> hf, split train
    assert isinstance(src, HfDiskSource) and len(src) == len(TRAIN) and len(src.files) == 2
    assert len(open_input(hf["one"])) == len(TRAIN)               # a Dataset.save_to_disk folder
    items = list(open_input(hf["hub"]).iter_items(range(len(TRAIN))))
    assert [it.id for it in items] == list(range(len(TRAIN)))
    assert items[5].where == "data/train-00001-of-00002.parquet row 1"
    assert items[2].item == {"conversations": conv("<|image|> or <|image|>: which is wider?", "The first one."),
                             "image": [(hf["img"] / "a.png").read_bytes(), (hf["img"] / "b.png").read_bytes()]}
    assert "image" not in items[1].item
    # any range starts where it should (a resume or a rank seeks into the right file and row group)
    for src in (open_input(hf["hub"]), open_input(hf["dict"])):
        for lo, hi in ((0, 8), (2, 5), (4, 8), (5, 6), (7, 8)):
            assert [it.item for it in src.iter_items(range(lo, hi))] == [it.item for it in items[lo:hi]]


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_rows_tokenize_exactly_like_the_same_conversations_as_lumina_json(hf, json_reference, tiny_bundle, tmp_path,
                                                                           kind):
    summary = pretok(hf["hub"] if kind == "parquet" else hf["dict"], tmp_path, tiny_bundle)
    assert summary["records"] == len(TRAIN) - 1 and summary["errors"] == 1
    got, want = rank_files(tmp_path), rank_files(json_reference)
    # tokens, labels and records byte for byte; the one error is the same item for the same reason
    assert got["tokens.bin"] == want["tokens.bin"] and got["record.jsonl"] == want["record.jsonl"]
    err, ref_err = errors(tmp_path), errors(json_reference)
    assert list(err) == list(ref_err) == [4] and err[4]["reason"] == ref_err[4]["reason"] == "image"
    assert "train-00001-of-00002.parquet row 0" in err[4]["error"] if kind == "parquet" else \
        "train/data-00001-of-00002.arrow row 0" in err[4]["error"]
    assert json.loads(got["run.json"])["in_format"] == kind


def test_two_ranks_equal_one_rank_for_any_batch_size_and_workers(hf, json_reference, tiny_bundle, tmp_path):
    for r in range(2):
        pretok(hf["dict"], tmp_path, tiny_bundle, "--splits", "2", "--rank", str(r), "--batch_size", "3",
               "--num_workers", "2" if r else "1")
    one = ShardReader(json_reference / "0-of-1-tokens.bin")
    want = {x.id: [a.tobytes() for a in one.read(x.offset, x.len)]
            for x in iter_record_file(json_reference / "0-of-1-record.jsonl")}
    got = {}
    for r in range(2):
        reader = ShardReader(tmp_path / f"{r}-of-2-tokens.bin")
        for x in iter_record_file(tmp_path / f"{r}-of-2-record.jsonl"):
            assert x.id not in got
            got[x.id] = [a.tobytes() for a in reader.read(x.offset, x.len)]
    assert got == want and sorted([*got, 4]) == list(range(len(TRAIN)))
    assert list(errors(tmp_path, 0, 2)) == [] and list(errors(tmp_path, 1, 2)) == [4]


def test_the_other_split_messages_paths_and_a_system_turn(hf, tiny_bundle, tmp_path):
    for kind, path in (("parquet", hf["hub"]), ("hf", hf["dict"])):
        out = tmp_path / kind
        summary = pretok(path, out, tiny_bundle, "--hf_split", "test", "--image_root", str(hf["img"]))
        assert summary["records"] == 2 and summary["errors"] == 1, kind
        err = errors(out)[1]
        assert err["reason"] == "input" and "message 0 is a system turn" in err["error"]
        assert json.loads((out / "0-of-1-run.json").read_text())["hf_split"] == "test"
    # the same as Lumina JSON (the image path of the parquet row resolves against --image_root)
    ref = tmp_path / "json"
    (tmp_path / "test.json").write_text(json.dumps([
        {"conversations": conv("<|image|>What now?", "Still noise."), "image": [str(hf["img"] / "a.png")]},
        {"conversations": conv("Hi", "Hello")},  # stands in for the refused row: its id must not count
        {"conversations": conv("Only text.", "Fine.")}]))
    pretok(tmp_path / "test.json", ref, tiny_bundle)
    recs = {k: [x for x in map(json.loads, (tmp_path / k / "0-of-1-record.jsonl").read_text().splitlines())]
            for k in ("parquet", "hf", "json")}
    assert [r["id"] for r in recs["parquet"]] == [r["id"] for r in recs["hf"]] == [0, 2]
    for k in ("parquet", "hf"):
        shard = ShardReader(tmp_path / k / "0-of-1-tokens.bin")
        ref_shard = ShardReader(ref / "0-of-1-tokens.bin")
        ref_rec = {r["id"]: r for r in recs["json"]}
        for r in recs[k]:
            got = [a.tolist() for a in shard.read(r["offset"], r["len"])]
            assert got == [a.tolist() for a in ref_shard.read(ref_rec[r["id"]]["offset"], ref_rec[r["id"]]["len"])]


def test_field_map_reads_other_column_names(hf, json_reference, tiny_bundle, tmp_path):
    ds = datasets.load_from_disk(str(hf["one"])).rename_columns({"conversations": "dialog", "images": "jpg"})
    ds.to_parquet(str(tmp_path / "renamed.parquet"))
    with pytest.raises(InputFileError, match=r"no conversation column.*dialog, jpg.*--field_map"):
        open_input(tmp_path / "renamed.parquet")
    pretok(tmp_path / "renamed.parquet", tmp_path / "out", tiny_bundle, "--field_map", "conversations=dialog,image=jpg")
    assert rank_files(tmp_path / "out")["tokens.bin"] == rank_files(json_reference)["tokens.bin"]
    for spec, phrase in (("conversations=nope", "no column 'nope'"), ("colour=jpg", "unknown field 'colour'"),
                         ("conversations", "expected FIELD=COLUMN")):
        with pytest.raises(InputFileError, match=phrase):
            open_input(tmp_path / "renamed.parquet", field_map=spec)
    with pytest.raises(InputFileError, match="--field_map applies to --in_format parquet and hf"):
        open_input(hf["json"], field_map="conversations=dialog")


def test_bad_rows_are_reported_and_the_run_goes_on(tmp_path, tiny_bundle):
    png = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(png, "PNG")
    rows = [{"conversations": None, "image": None},                                          # no conversation
            {"conversations": conv("<image> <image>", "Two?"), "image": {"bytes": png.getvalue(), "path": None}},
            {"conversations": conv("Fine.", "Good."), "image": None},
            {"conversations": conv("<image>", "Here."), "image": {"bytes": None, "path": "gone.png"}},
            {"conversations": [{"from": "gpt", "value": "first"}], "image": None}]
    (tmp_path / "gone.png").write_bytes(png.getvalue())  # datasets wants it while writing; then it is gone
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        datasets.Dataset.from_list(rows, features=datasets.Features({
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
            "image": datasets.Image()})).to_parquet(str(tmp_path / "bad.parquet"))
    finally:
        os.chdir(cwd)
    (tmp_path / "gone.png").unlink()
    summary = pretok(tmp_path / "bad.parquet", tmp_path / "out", tiny_bundle)
    assert summary["records"] == 1 and summary["errors"] == 4
    err = errors(tmp_path / "out")
    assert err[0]["reason"] == "input" and "column 'conversations' is null" in err[0]["error"]
    assert err[1]["reason"] == "conversation" and "2 <|image|> placeholder(s)" in err[1]["error"]
    assert err[3]["reason"] == "image" and "gone.png: no such file" in err[3]["error"]
    assert err[4]["reason"] == "conversation" and "roles must alternate" in err[4]["error"]
    assert all(e["error"].startswith(f"bad.parquet row {i}:") for i, e in err.items())


def test_row_shapes_other_datasets_use():
    cols = Columns("messages", "messages", "images", None, ("role", "from"), ("content", "value"))
    item, err = row_to_item({"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                                        {"type": "text", "text": " What?"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}],
                             "images": [b"\x89PNG..."]}, cols)
    assert err is None and item == {"conversations": [{"from": "user", "value": "<|image|> What?"},
                                                      {"from": "assistant", "value": "Noise."}],
                                    "image": [b"\x89PNG..."]}
    item, err = row_to_item({"messages": json.dumps([{"role": "user", "content": "Hi"}]), "images": "x.jpg"}, cols)
    assert err is None and item == {"conversations": [{"from": "user", "value": "Hi"}], "image": ["x.jpg"]}
    for images, phrase in (([None], "column 'images'[0] is null"), ([{"bytes": None, "path": None}], "neither bytes"),
                           ([3], "is a int")):
        assert phrase in row_to_item({"messages": [], "images": images}, cols)[1]


def test_bad_input_folders_stop_at_once_naming_the_problem(hf, tmp_path, tiny_bundle, caplog):
    with pytest.raises(InputFileError, match=r"--hf_split 'dev': not a split .*\(splits: train, test\)"):
        open_input(hf["dict"], hf_split="dev")
    with pytest.raises(InputFileError, match=r"--hf_split 'dev': no parquet file of this split.*splits there: "
                                             r"test, train"):
        open_input(hf["hub"], hf_split="dev")
    (tmp_path / "notparquet.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(InputFileError, match="notparquet.parquet is not a readable parquet file"):
        open_input(tmp_path / "notparquet.parquet")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (broken / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(InputFileError, match="data-00000-of-00001.arrow is not an Arrow stream"):
        open_input(broken)
    assert main(["--in_filename", str(tmp_path / "none*.parquet"), "--out_dir", str(tmp_path / "o"),
                 "--tokenizer_dir", str(tiny_bundle)]) == 2
    assert "the pattern matches no .parquet file" in caplog.text and not (tmp_path / "o").exists()


def test_missing_pyarrow_names_the_extra_to_install(hf, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(InputFileError, match=r"need pyarrow, which is not installed: pip install -e \.\[hf\]"):
        open_input(hf["hub"])


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_gives_byte_identical_output(tmp_path, tiny_bundle):
    rng = np.random.default_rng(1)
    pngs = []
    for k in range(4):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32 + 8 * k, 3), dtype=np.uint8)).save(b, "PNG")
        pngs.append(b.getvalue())
    rows = [{"conversations": conv("<image> What is it?", f"Noise {i}."),
             "image": {"bytes": NOT_AN_IMAGE if i % 11 == 5 else pngs[i % 4], "path": None}} for i in range(300)]
    data = tmp_path / "data"
    (data / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_list(rows, features=datasets.Features({
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "image": datasets.Image()}))
    for k in range(3):  # three shards of row groups of 16 rows: a resume seeks into a row group
        ds.shard(3, k, contiguous=True).to_parquet(str(data / "data" / f"train-{k:05d}-of-00003.parquet"),
                                                   batch_size=16)
    ref, out = tmp_path / "ref", tmp_path / "out"
    pretok(data, ref, tiny_bundle)
    cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(data), "--out_dir", str(out),
           "--tokenizer_dir", str(tiny_bundle), "--target_size", "64", "--no_progress", "--num_workers", "1",
           "--batch_size", "4", "--commit_items", "1", "--threads", "1"]
    rec = out / "0-of-1-record.jsonl"
    killed_at = kill_at_lines(cmd, REPO, rec, (40, 150))
    assert not (out / "0-of-1-done.json").exists() and 0 < killed_at[0] < killed_at[1] < 270, killed_at
    assert main(["--in_filename", str(data), "--out_dir", str(out), "--tokenizer_dir", str(tiny_bundle),
                 "--target_size", "64", "--no_progress", "--num_workers", "2"]) == 0
    assert rank_files(out) == rank_files(ref)
    assert len(errors(ref)) == 27


def test_a_video_column_of_bytes_or_paths_tokenizes_like_the_video_files(tmp_path, tiny_bundle):
    pytest.importorskip("av")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from video_helper import make_video

    clip = make_video(tmp_path / "clip.mp4", n=8)
    convs = [conv("<video> What changes?", "The red."), conv("And this one?", "Same.")]
    # bytes in one row, a path (against the input's directory) in the other, in the {bytes, path} struct of
    # the datasets Image / Video features
    pq.write_table(pa.Table.from_pylist([
        {"conversations": convs[0], "video": {"bytes": clip.read_bytes(), "path": None}},
        {"conversations": convs[1], "video": {"bytes": None, "path": "clip.mp4"}}]), tmp_path / "v.parquet")
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"conversations": c, "video": "clip.mp4"}) + "\n"
                                              for c in convs))
    flags = ("--video_frames", "2", "--video_target_size", "64")
    pretok(tmp_path / "v.parquet", tmp_path / "p", tiny_bundle, *flags)
    pretok(tmp_path / "v.jsonl", tmp_path / "j", tiny_bundle, *flags)
    got, want = rank_files(tmp_path / "p"), rank_files(tmp_path / "j")
    assert json.loads(want["done.json"])["records"] == 2
    assert got["tokens.bin"] == want["tokens.bin"] and got["record.jsonl"] == want["record.jsonl"]

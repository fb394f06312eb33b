"""Reliability: bad inputs. A generated corpus of broken items and files goes through pre_tokenize.py.

- Every broken item is rejected into ``errors.jsonl`` with a reason a person understands, every good
  item (odd image modes included: they are converted, not rejected) is kept, byte-identical to
  processing it alone; an item longer than max_seq_len is kept whole by pre-tokenization and truncated by
  the training dataset.
- Broken input files stop the run at once with a message naming the file, writing nothing.
- A property-based test (hypothesis) of the item processor: random conversations either raise an
  ItemError with a message, exactly when the conversation breaks a rule, or give a sequence whose labels
  obey the rules.

The kinds and their outcomes are tabulated in tests/README.md.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from tar_helper import write_tar
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from data.data_config import DataSource
from data.dataset import RecordDataset
from data.item_processor import ItemError, ItemProcessor
from data.records import IGNORE_INDEX, ShardReader, iter_record_file
from pre_tokenize.pre_tokenize import PretokArgs, main, run

TARGET = 64        # smallest useful crop budget: 64x64 -> 4x4 codes -> 25-token image blocks
MAX_SEQ_LEN = 256  # the training side's cut for the long item
EOT = "<reserved08706>"
MARKER = "<|image|>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- images


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A 100-byte PNG whose header claims 30000x30000 pixels (10x PIL's MAX_IMAGE_PIXELS)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_images(img: Path) -> None:
    img.mkdir()
    noise(40, 40, 0).save(img / "rgb.png")
    # odd modes and formats, all convertible (DESIGN: P and 1-bit go through RGBA/RGB; 16-bit, float,
    # CMYK are scaled/converted), so all must be KEPT
    noise(40, 40, 1).convert("P", palette=Image.Palette.ADAPTIVE).save(img / "palette.png")
    pal = noise(40, 40, 2).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(img / "palette_transparent.png", transparency=0)
    noise(40, 40, 3, "1").save(img / "bilevel.png")
    noise(48, 32, 4, "L").save(img / "gray.png")
    noise(40, 40, 5, "LA").save(img / "gray_alpha.png")
    Image.fromarray(np.random.default_rng(6).integers(0, 65536, (40, 40)).astype(np.uint16)).save(img / "16bit.png")
    Image.fromarray(np.random.default_rng(7).random((40, 40)).astype(np.float32), "F").save(img / "float.tif")
    int32 = np.random.default_rng(8).integers(0, 1 << 20, (40, 40)).astype(np.int32)
    Image.fromarray(int32, "I").save(img / "int32.tif")
    noise(40, 40, 9, "CMYK").save(img / "cmyk.jpg")
    rgba = np.concatenate([np.asarray(noise(40, 40, 10)), np.full((40, 40, 1), 100, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(img / "rgba.png")
    frames = [noise(40, 40, 11 + k).convert("P", palette=Image.Palette.ADAPTIVE) for k in range(3)]
    frames[0].save(img / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    noise(1, 1, 14).save(img / "one_pixel.png")
    noise(40, 40, 15).save(img / "png_named.jpg", format="PNG")  # wrong extension
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(64, 32, 16).save(img / "exif_rotated.jpg", exif=exif)
    noise(32, 48, 17).save(img / "second.png")
    # broken
    (img / "empty.png").write_bytes(b"")
    (img / "corrupt.png").write_bytes(np.random.default_rng(18).integers(0, 256, 600, dtype=np.uint8).tobytes())
    full_png = png_bytes(noise(64, 64, 19))
    (img / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    full_jpg = png_bytes(noise(64, 64, 20), "JPEG", quality=90)
    (img / "truncated.jpg").write_bytes(full_jpg[: len(full_jpg) // 2])
    (img / "bomb.png").write_bytes(bomb_png())
    (img / "text.png").write_text("this is not an image\n")
    (img / "a_directory.png").mkdir()
    noise(4000, 1, 21).save(img / "strip.png")


# --------------------------------------------------------------------------------------------- corpus

KEPT = "kept"


def conv(*turns: str, roles=("human", "gpt")) -> list[dict]:
    return [{"from": roles[k % 2], "value": t} for k, t in enumerate(turns)]


def one(image, q: str = f"{MARKER} What is this?", a: str = "Noise.") -> dict:
    return {"conversations": conv(q, a), "image": image}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


LONG_ANSWER = " ".join(f"word{k % 97} and more" for k in range(1500))

# (kind, outcome, JSONL line). outcome: KEPT, or (reason, phrase the error must contain)
ITEM_KINDS: list[tuple[str, object, bytes]] = [
    # --- good items, including odd-but-valid ones
    ("plain RGB image", KEPT, line(one(["img/rgb.png"]))),
    ("text only, 2 rounds", KEPT, line({"conversations": conv("Hi.", "Hello.", "More?", "Yes.")})),
    ("image in the assistant turn", KEPT, line({"conversations": conv("Draw noise.", f"Here: {MARKER}"),
                                                "image": ["img/second.png"]})),
    ("two images, no marker (prepended)", KEPT, line({"conversations": conv("Compare.", "Both noise."),
                                                      "image": ["img/rgb.png", "img/second.png"]})),
    ("image as a string, not a list", KEPT, line(one("img/rgb.png"))),
    ("same image twice", KEPT, line({"conversations": conv(f"{MARKER}{MARKER}", "Twins."),
                                     "image": ["img/rgb.png", "img/rgb.png"]})),
    ("role names in other letter case (Human/GPT, USER/Assistant)", KEPT,
     line({"conversations": [{"from": "Human", "value": "a"}, {"from": "GPT", "value": "b"},
                             {"from": "USER", "value": "c"}, {"from": "Assistant", "value": "d"}]})),
    ("extra keys in the item and the messages", KEPT,
     line({"id": "x-17", "meta": {"src": 1}, "conversations": [{"from": "human", "value": "q", "lang": "en"},
                                                                 {"from": "gpt", "value": "a"}]})),
    ("empty human turn", KEPT, line({"conversations": conv("", "Answer anyway.")})),
    ("control characters, NUL, RTL, emoji in text", KEPT,
     line({"conversations": conv("a\x00b\x07c\u202eabc\U0001F600", "ok\ttab\r\nnewline")})),
    ("non-ASCII text (CJK, accents)", KEPT, line({"conversations": conv("这是什么？", "Ça va, naïve café.")})),
    ("palette (P) image", KEPT, line(one(["img/palette.png"]))),
    ("palette image with transparency", KEPT, line(one(["img/palette_transparent.png"]))),
    ("1-bit image", KEPT, line(one(["img/bilevel.png"]))),
    ("grayscale (L) image", KEPT, line(one(["img/gray.png"]))),
    ("grayscale + alpha (LA) image", KEPT, line(one(["img/gray_alpha.png"]))),
    ("16-bit grayscale PNG", KEPT, line(one(["img/16bit.png"]))),
    ("32-bit float TIFF (F)", KEPT, line(one(["img/float.tif"]))),
    ("32-bit integer TIFF (I)", KEPT, line(one(["img/int32.tif"]))),
    ("CMYK JPEG", KEPT, line(one(["img/cmyk.jpg"]))),
    ("RGBA with transparency", KEPT, line(one(["img/rgba.png"]))),
    ("animated GIF (first frame)", KEPT, line(one(["img/animated.gif"]))),
    ("1x1 pixel image", KEPT, line(one(["img/one_pixel.png"]))),
    ("PNG with a .jpg name", KEPT, line(one(["img/png_named.jpg"]))),
    ("EXIF-rotated JPEG", KEPT, line(one(["img/exif_rotated.jpg"]))),
    ("text far beyond max_seq_len", KEPT, line({"conversations": conv("Say a lot.", LONG_ANSWER)})),
    # --- broken images
    ("0-byte image", ("image", "empty file (0 bytes)"), line(one(["img/empty.png"]))),
    ("corrupt image (random bytes)", ("image", "not an image PIL can identify"), line(one(["img/corrupt.png"]))),
    ("truncated PNG", ("image", "truncated"), line(one(["img/truncated.png"]))),
    ("truncated JPEG", ("image", "truncated"), line(one(["img/truncated.jpg"]))),
    ("decompression bomb (30000x30000 header)", ("image", "decompression bomb"), line(one(["img/bomb.png"]))),
    ("text file with an image name", ("image", "not an image PIL can identify"), line(one(["img/text.png"]))),
    ("missing image file", ("image", "no such file"), line(one(["img/missing.png"]))),
    ("image path is a directory", ("image", "not a file"), line(one(["img/a_directory.png"]))),
    ("extreme aspect ratio (4000x1)", ("image", "too extreme"), line(one(["img/strip.png"]))),
    ("second of two images broken", ("image", "image 1 cannot be used"),
     line({"conversations": conv(f"{MARKER} and {MARKER}", "x"), "image": ["img/rgb.png", "img/empty.png"]})),
    ("lone surrogate in an image path", ("image", "no such file"), line(one(["img/\ud800.png"]))),
    # --- wrong JSON types and missing keys
    ("no 'conversations' key", ("conversation", "item has no 'conversations'"), line({"image": ["img/rgb.png"]})),
    ("'conversations' is null", ("conversation", "'conversations' is null"), line({"conversations": None})),
    ("'conversations' is a string", ("conversation", "must be a list of messages, got str"),
     line({"conversations": "human: hi"})),
    ("'conversations' is empty", ("conversation", "empty conversation"), line({"conversations": []})),
    ("a message is a string", ("conversation", "conversations[1] must be an object"),
     line({"conversations": [{"from": "human", "value": "q"}, "gpt: a"]})),
    ("a message without 'value'", ("conversation", "needs both 'from' and 'value'"),
     line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]})),
    ("a message without 'from'", ("conversation", "needs both 'from' and 'value'"),
     line({"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]})),
    ("'value' is a number", ("conversation", "'value' must be a string, got int"),
     line({"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "a"}]})),
    ("'value' is null", ("conversation", "'value' must be a string, got NoneType"),
     line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]})),
    ("'image' is a number", ("conversation", "expected a path or encoded image bytes, got int"),
     line({"conversations": conv("q", "a"), "image": 7})),
    ("'image' is an object", ("conversation", "expected a path or encoded image bytes, got dict"),
     line({"conversations": conv("q", "a"), "image": {"path": "img/rgb.png"}})),
    ("'image' list holds null", ("conversation", "expected a path or encoded image bytes, got NoneType"),
     line({"conversations": conv(f"{MARKER} q", "a"), "image": [None]})),
    ("item is a JSON array", ("input", "expected a JSON object with \"conversations\", got a list"),
     line([{"from": "human", "value": "q"}])),
    ("item is a JSON string", ("input", "got a str"), line("just a string")),
    ("item is a JSON number", ("input", "got a int"), line(12)),
    # --- wrong roles and placeholder mismatches
    ("unknown role", ("conversation", "unknown role 'system'"),
     line({"conversations": [{"from": "system", "value": "be nice"}, {"from": "gpt", "value": "a"}]})),
    ("role is not a string", ("conversation", "unknown role 1"),
     line({"conversations": [{"from": 1, "value": "q"}, {"from": "gpt", "value": "a"}]})),
    ("assistant speaks first", ("conversation", "roles must alternate"),
     line({"conversations": conv("a", "q", roles=("gpt", "human"))})),
    ("two human turns in a row", ("conversation", "roles must alternate"),
     line({"conversations": [{"from": "human", "value": "q"}, {"from": "user", "value": "q2"},
                             {"from": "gpt", "value": "a"}]})),
    ("no assistant turn", ("conversation", "no assistant (gpt/assistant) turn"),
     line({"conversations": [{"from": "human", "value": "q"}]})),
    ("only empty assistant turns", ("conversation", "every assistant turn is empty"),
     line({"conversations": conv("q", "   \n")})),
    ("more markers than images", ("conversation", "2 <|image|> placeholder(s) in the conversation but 1 image(s)"),
     line(one(["img/rgb.png"], q=f"{MARKER} vs {MARKER}"))),
    ("fewer markers than images", ("conversation", "1 <|image|> placeholder(s) in the conversation but 2 image(s)"),
     line(one(["img/rgb.png", "img/second.png"]))),
    ("marker but no image", ("conversation", "1 <|image|> placeholder(s) in the conversation but 0 image(s)"),
     line({"conversations": conv(f"{MARKER} what?", "nothing")})),
    # --- broken lines and text
    ("non-UTF-8 bytes in a line", ("input", "not UTF-8 text"),
     b'{"conversations": [{"from": "human", "value": "caf\xe9 \xff"}, {"from": "gpt", "value": "a"}]}\n'),
    ("truncated JSON line", ("input", "not a JSON line"), b'{"conversations": [{"from": "human", "val\n'),
    ("JSON nested 100000 deep", ("input", "nested too deeply"), b"[" * 100000 + b"]" * 100000 + b"\n"),
    ("lone surrogate in the text", ("conversation", "not valid Unicode"),
     line({"conversations": conv("q \ud800 q", "a")})),
]
GOOD_KINDS = [k for k, o, _ in ITEM_KINDS if o == KEPT]
BAD_KINDS = [k for k, o, _ in ITEM_KINDS if o != KEPT]


@pytest.fixture(scope="module")
def corpus(tiny_bundle, tmp_path_factory) -> dict:
    """The corpus as one JSONL (bad items between good ones), pre-tokenized as 2 ranks with 1 worker each."""
    d = tmp_path_factory.mktemp("bad_inputs")
    write_images(d / "img")
    order = list(range(len(ITEM_KINDS)))
    np.random.default_rng(0).shuffle(order)  # interleave good and bad
    (d / "corpus.jsonl").write_bytes(b"".join(ITEM_KINDS[k][2] for k in order))
    out = d / "out"
    for rank in range(2):
        run(PretokArgs.parse(["--in_filename", str(d / "corpus.jsonl"), "--out_dir", str(out), "--tokenizer_dir",
                              str(tiny_bundle), "--target_size", str(TARGET), "--splits", "2", "--rank", str(rank),
                              "--num_workers", "1", "--no_progress"]))
    return {"dir": d, "out": out, "order": order}


def _outputs(out: Path, splits: int = 2) -> tuple[dict, dict]:
    records, errors = {}, {}
    for r in range(splits):
        reader = ShardReader(out / f"{r}-of-{splits}-tokens.bin")
        for rec in iter_record_file(out / f"{r}-of-{splits}-record.jsonl"):
            assert rec.id not in records
            records[rec.id] = (rec, *reader.read(rec.offset, rec.len))
        for ln in (out / f"{r}-of-{splits}-errors.jsonl").read_text(encoding="utf-8").splitlines():
            e = json.loads(ln)
            assert e["id"] not in errors
            errors[e["id"]] = e
    return records, errors


def test_corpus_has_at_least_20_broken_kinds_with_distinct_names():
    assert len(BAD_KINDS) >= 20 and len(set(k for k, _, _ in ITEM_KINDS)) == len(ITEM_KINDS)


def test_every_broken_item_is_rejected_with_its_reason_and_every_good_item_is_kept(corpus):
    records, errors = _outputs(corpus["out"])
    assert set(records) | set(errors) == set(range(len(ITEM_KINDS))) and not set(records) & set(errors)
    for i, k in enumerate(corpus["order"]):
        kind, outcome, _ = ITEM_KINDS[k]
        if outcome == KEPT:
            assert i in records, f"good item {kind!r} (id {i}) was rejected: {errors.get(i)}"
            continue
        assert i in errors, f"broken item {kind!r} (id {i}) was not rejected"
        reason, phrase = outcome
        e = errors[i]
        assert e["error"].startswith(f"corpus.jsonl line {i + 1}: "), (kind, e)
        assert phrase in e["error"] and e["reason"] == reason, (kind, e)
    done = [json.loads((corpus["out"] / f"{r}-of-2-done.json").read_text()) for r in range(2)]
    assert sum(d["records"] for d in done) == len(GOOD_KINDS) and sum(d["errors"] for d in done) == len(BAD_KINDS)


def test_good_items_are_byte_identical_to_processing_each_alone(corpus, tiny_tokenizer):
    """Bad neighbours (and ranks, workers) change nothing: each good item equals ItemProcessor on it alone."""
    records, _ = _outputs(corpus["out"])
    proc = ItemProcessor(tiny_tokenizer, TARGET)
    for i, k in enumerate(corpus["order"]):
        kind, outcome, raw = ITEM_KINDS[k]
        if outcome != KEPT:
            continue
        prepared = proc.prepare(json.loads(raw), corpus["dir"])
        codes = [tiny_tokenizer.encode_images(img) for img in prepared.images]
        tokens, labels = proc.assemble(prepared, codes)
        rec, got_t, got_l = records[i]
        assert rec.len == len(tokens), kind
        assert np.asarray(tokens, "<i4").tobytes() == got_t.astype("<i4").tobytes(), kind
        assert np.asarray(labels, "<i4").tobytes() == got_l.astype("<i4").tobytes(), kind


def test_odd_image_modes_are_converted_not_rejected(corpus, tiny_tokenizer):
    records, _ = _outputs(corpus["out"])
    modes = ["palette (P) image", "palette image with transparency", "1-bit image", "grayscale (L) image",
             "grayscale + alpha (LA) image", "16-bit grayscale PNG", "32-bit float TIFF (F)", "32-bit integer TIFF (I)",
             "CMYK JPEG", "RGBA with transparency", "animated GIF (first frame)", "1x1 pixel image",
             "PNG with a .jpg name", "EXIF-rotated JPEG"]
    assert set(modes) <= set(GOOD_KINDS)
    by_kind = {ITEM_KINDS[k][0]: i for i, k in enumerate(corpus["order"])}
    for kind in modes:
        rec, tokens, _ = records[by_kind[kind]]
        assert tiny_tokenizer.find_image_blocks(tokens), kind
    # the EXIF rotation is applied: stored 64 wide x 32 high, shown 32 x 64, so the block is taller than wide
    _, tokens, _ = records[by_kind["EXIF-rotated JPEG"]]
    (s, e), = tiny_tokenizer.find_image_blocks(tokens)
    h, w = tiny_tokenizer.parse_image_block(tokens[s:e]).shape
    assert h > w


def test_long_item_is_kept_whole_by_pretokenization_and_truncated_by_the_training_dataset(corpus):
    records, _ = _outputs(corpus["out"])
    i = next(i for i, k in enumerate(corpus["order"]) if ITEM_KINDS[k][0] == "text far beyond max_seq_len")
    rec, tokens, labels = records[i]
    assert rec.len == len(tokens) > 4 * MAX_SEQ_LEN
    rank = 0 if i < (len(ITEM_KINDS) + 1) // 2 else 1
    ds = RecordDataset([DataSource(corpus["out"] / f"{rank}-of-2-record.jsonl")], max_seq_len=MAX_SEQ_LEN)
    row = [r.id for r in iter_record_file(corpus["out"] / f"{rank}-of-2-record.jsonl")].index(i)
    assert int(ds.lengths[row]) == rec.len  # the sampler sees the true length
    got = ds[row]
    assert len(got["input_ids"]) == MAX_SEQ_LEN
    np.testing.assert_array_equal(got["input_ids"], tokens[:MAX_SEQ_LEN])
    np.testing.assert_array_equal(got["labels"], labels[:MAX_SEQ_LEN])


# ----------------------------------------------------------------------------------- webdataset kinds




WDS_KINDS = [  # (kind, outcome, members of the sample "s{k}")
    ("good sample", KEPT, {"png": "rgb", "json": {"question": "What?"}, "txt": b"Noise.\n"}),
    ("answer in the json instead of a txt", KEPT, {"jpg": "rgb", "json": {"question": "What?", "answer": "Noise."}}),
    ("sample without an image", ("input", "no image member"), {"json": {"question": "What?"}, "txt": b"a"}),
    ("sample without a json", ("input", "no .json member"), {"png": "rgb", "txt": b"a"}),
    ("json member that is not JSON", ("input", ".json is not JSON"), {"png": "rgb", "json": b"{oops", "txt": b"a"}),
    ("json without a question", ("input", "has no string \"question\""), {"png": "rgb", "json": {"q": 1}, "txt": b"a"}),
    ("txt member that is not UTF-8", ("input", ".txt is not UTF-8"),
     {"png": "rgb", "json": {"question": "What?"}, "txt": b"caf\xe9"}),
    ("no answer at all", ("input", "no .txt answer"), {"png": "rgb", "json": {"question": "What?"}}),
    ("corrupt image member", ("image", "not an image PIL can identify"),
     {"png": b"\x89PNG garbage", "json": {"question": "What?"}, "txt": b"a"}),
    ("0-byte image member", ("image", "empty (0 bytes)"), {"png": b"", "json": {"question": "What?"}, "txt": b"a"}),
    ("member name with ../ (never extracted)", KEPT,
     {"png": "rgb", "json": {"question": "What?"}, "txt": b"ok", "_prefix": "../../escape/"}),
]


def test_webdataset_samples_broken_in_each_way_are_rejected_and_good_ones_kept(tiny_bundle, tmp_path):
    rgb = png_bytes(noise(40, 40, 0))
    members = []
    for k, (_, _, spec) in enumerate(WDS_KINDS):
        prefix = spec.get("_prefix", "")
        for ext, v in spec.items():
            if ext == "_prefix":
                continue
            data = rgb if v == "rgb" else json.dumps(v).encode() if isinstance(v, dict) else v
            members.append((f"{prefix}s{k:03d}.{ext}", data))
    (tmp_path / "wds").mkdir()
    write_tar(tmp_path / "wds" / "shard-000.tar", members)
    run(PretokArgs.parse(["--in_filename", str(tmp_path / "wds"), "--out_dir", str(tmp_path / "out"),
                          "--tokenizer_dir", str(tiny_bundle), "--target_size", str(TARGET), "--num_workers", "0",
                          "--no_progress"]))
    records, errors = _outputs(tmp_path / "out", splits=1)
    assert set(records) | set(errors) == set(range(len(WDS_KINDS)))
    for i, (kind, outcome, _) in enumerate(WDS_KINDS):
        if outcome == KEPT:
            assert i in records, (kind, errors.get(i))
        else:
            assert i in errors and outcome[1] in errors[i]["error"] and errors[i]["reason"] == outcome[0], \
                (kind, errors.get(i))
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


# ------------------------------------------------------------------------------------- broken files


def _bad_tar(p: Path) -> None:
    p.mkdir()
    (p / "shard-000.tar").write_bytes(b"\x00not a tar" * 100)


FILE_KINDS = [  # (kind, file name, how to make it, phrase)
    ("missing file", "missing.jsonl", None, "file not found"),
    ("0-byte JSON file", "empty.json", lambda p: p.write_bytes(b""), "not a JSON file"),
    ("JSON object instead of a list", "dict.json", lambda p: p.write_text('{"conversations": []}'),
     "expected a JSON list of items, got a dict"),
    ("JSON list nested 100000 deep", "deep.json", lambda p: p.write_bytes(b"[" * 100000 + b"]" * 100000),
     "nested too deeply"),
    ("binary garbage as JSONL", "garbage.jsonl",
     lambda p: p.write_bytes(np.random.default_rng(0).integers(1, 256, 3000, dtype=np.uint8).tobytes()),
     "not a JSONL file"),
    ("non-UTF-8 JSON file", "latin1.json", lambda p: p.write_bytes(b'[{"a": "caf\xe9"}]'), "not a JSON file"),
    ("directory without .tar shards", "empty_dir", lambda p: p.mkdir(), "no webdataset .tar shards"),
    ("damaged tar shard", "bad_tar", _bad_tar, "shard-000.tar"),
    ("unknown extension", "data.txt", lambda p: p.write_text("[]"), "cannot tell the format"),
]


@pytest.mark.parametrize("kind,name,make,phrase", FILE_KINDS, ids=[k[0] for k in FILE_KINDS])
def test_broken_input_file_stops_at_once_naming_the_file_and_writes_nothing(tmp_path, tiny_bundle, caplog,
                                                                           kind, name, make, phrase):
    path = tmp_path / name
    if make is not None:
        make(path)
    assert main(["--in_filename", str(path), "--out_dir", str(tmp_path / "out"), "--tokenizer_dir",
                 str(tiny_bundle), "--no_progress"]) == 2
    assert phrase in caplog.text and str(path) in caplog.text, caplog.text[-2000:]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- property-based test

ROLES = ["human", "Human", "USER", "user", "gpt", "GPT", "assistant", "Assistant", "system", "", 3, None]
PIECES = ["a", "b c", " ", "\n", "é", "中", "🙂", ".", "<", ">", "|", "<image>", "\x00",
          EOT]  # a literal end-of-turn string becomes that token, as in Lumina's one-string encoding


BROKEN_IMAGES = {8: b"", 9: b"\x89PNG\r\n\x1a\nbroken"}  # codes 8 and 9 (hypothesis favours small draws)


def _png(spec) -> bytes:
    code, w, h, mode, seed = spec
    return BROKEN_IMAGES[code] if code in BROKEN_IMAGES else png_bytes(noise(w, h, seed).convert(mode))


texts = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
values = st.one_of(texts, texts, texts, st.integers(), st.none())
messages = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": values}),
    st.fixed_dictionaries({"from": st.sampled_from(ROLES[:8])}),          # no value
    st.fixed_dictionaries({"value": texts}),                            # no role
    texts,                                                               # not an object
)
good_turns = st.lists(st.tuples(st.sampled_from(["human", "Human", "USER", "user"]), texts,
                                st.sampled_from(["gpt", "GPT", "assistant", "Assistant"]), texts),
                      min_size=1, max_size=3).map(
    lambda rounds: [m for hr, q, ar, a in rounds for m in ({"from": hr, "value": q}, {"from": ar, "value": a})])
image_lists = st.lists(st.tuples(st.integers(0, 9), st.integers(1, 80), st.integers(1, 80),
                                 st.sampled_from(["RGB", "L", "P", "RGBA", "1", "LA"]), st.integers(0, 3)).map(_png),
                       min_size=1, max_size=3)


VARIANTS = ["markers match"] * 4 + ["no markers"] * 2 + ["markers off by one", "a role broken", "random messages"]


@st.composite
def items(draw) -> dict:
    """Conversations that mostly follow the rules (so many get past validation), with the image markers
    placed at random positions, and variants that break one rule or are random."""
    variant = draw(st.sampled_from(VARIANTS))
    imgs = draw(st.one_of(st.none(), image_lists))
    n = len(imgs or [])
    if variant == "random messages":
        conv_ = draw(st.lists(messages, max_size=4))
    else:
        conv_ = draw(good_turns)
        k = {"markers match": n, "no markers": 0}.get(variant, n + draw(st.sampled_from([-1, 1])) if n else 1)
        for _ in range(k if variant != "a role broken" else n):
            m = conv_[draw(st.integers(0, len(conv_) - 1))]
            pos = draw(st.integers(0, len(m["value"])))
            m["value"] = m["value"][:pos] + MARKER + m["value"][pos:]
        if variant == "a role broken":
            conv_[draw(st.integers(0, len(conv_) - 1))]["from"] = draw(st.sampled_from(ROLES))
    event(variant)
    item = {"conversations": conv_}
    if imgs is not None:
        item["image"] = imgs[0] if len(imgs) == 1 and draw(st.booleans()) else imgs
    return item


def expected_problem(item: dict) -> str | None:
    """The rules of DESIGN "One training sequence", written independently of the processor."""
    conv_ = item["conversations"]
    if not conv_:
        return "empty"
    for k, m in enumerate(conv_):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            return "shape"
        role = m["from"].lower() if isinstance(m["from"], str) else None
        if role not in ("human", "user", "gpt", "assistant"):
            return "role"
        if not isinstance(m["value"], str):
            return "value"
        if (role in ("human", "user")) != (k % 2 == 0):
            return "order"
    imgs = item.get("image")
    imgs = [] if imgs is None else imgs if isinstance(imgs, list) else [imgs]
    markers = sum(m["value"].count(MARKER) for m in conv_)
    if markers and markers != len(imgs):
        return "markers"
    if len(conv_) < 2 or all(not m["value"].strip() for m in conv_[1::2]):
        return "nothing to train on"
    if any(len(b) < 20 for b in imgs):
        return "image"
    return None


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(item=items())
def test_item_processor_either_rejects_with_a_message_or_obeys_the_label_rules(tiny_tokenizer, item):
    tok = tiny_tokenizer
    proc = ItemProcessor(tok, TARGET)
    problem = expected_problem(item)
    try:
        tokens, labels = proc.process_item(item)
    except ItemError as e:
        assert problem is not None, f"rejected a valid item: {e}"
        assert str(e).strip()
        event(f"rejected: {problem}")
        return
    assert problem is None, f"accepted an item with a problem ({problem})"
    event(f"accepted, {'with' if item.get('image') else 'without'} images")
    conv_ = item["conversations"]
    imgs = item.get("image")
    n_images = 0 if imgs is None else len(imgs) if isinstance(imgs, list) else 1
    t, lab = np.asarray(tokens), np.asarray(labels)
    assert len(t) == len(lab) and t[0] == tok.bos_id and lab[0] == IGNORE_INDEX
    assert ((lab == t) | (lab == IGNORE_INDEX)).all()
    # image blocks: one per image, well formed (parse_image_block checks sizes, rows, codes), all-or-nothing labels
    blocks = tok.find_image_blocks(t)
    assert len(blocks) == n_images
    for s, e in blocks:
        codes = tok.parse_image_block(t[s:e])
        assert e - s == tok.image_block_len(16 * codes.shape[0], 16 * codes.shape[1])
        assert (lab[s:e] == IGNORE_INDEX).all() or (lab[s:e] == t[s:e]).all()
    eot = tok.eot_id
    literal = sum(part.count(EOT) for m in conv_ for part in m["value"].split(MARKER))
    assert int((t == eot).sum()) == len(conv_) + literal
    if literal == 0:  # each turn ends at its EOT: human turns unlabelled, assistant turns labelled whole
        ends = np.flatnonzero(t == eot)
        start = 1
        for k, end in enumerate(ends):
            span = slice(start, end + 1)
            if k % 2 == 0:
                assert (lab[span] == IGNORE_INDEX).all(), k
            else:
                assert (lab[span] == t[span]).all(), k
            start = end + 1
        assert start == len(t)  # no EOS, nothing after the last turn

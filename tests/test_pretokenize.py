"""pre_tokenize/pre_tokenize.py end to end on the tiny bundle: exactly once, invariance, bad inputs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from kill_helper import kill_at_lines
from tar_helper import write_tar
from PIL import Image

from data.records import IGNORE_INDEX, ShardReader, iter_record_file
from pre_tokenize.pre_tokenize import PretokArgs, main, run

REPO = Path(__file__).resolve().parents[1]
TARGET = "128"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def bomb_png(path: Path) -> None:
    """A tiny PNG whose header claims 30000x30000 pixels (10x PIL's MAX_IMAGE_PIXELS)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


# id -> what the item is; "!" marks items that must be rejected, with a phrase their error must contain
GOOD, BAD = "good", "bad"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pretok_data")
    img = d / "img"
    img.mkdir()
    noise(64, 64, 0).save(img / "rgb.png")
    noise(96, 64, 1, "L").save(img / "gray.png")
    noise(64, 64, 2).convert("P", palette=Image.Palette.ADAPTIVE).save(img / "palette.png")
    noise(64, 64, 3, "CMYK").save(img / "cmyk.jpg")
    Image.fromarray((np.random.default_rng(4).integers(0, 65536, (96, 64))).astype(np.uint16)).save(img / "16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 128 wide x 64 high, shown 64 wide x 128 high
    noise(128, 64, 5).save(img / "exif.jpg", exif=exif)
    rgba = np.concatenate([np.asarray(noise(64, 64, 6)), np.full((64, 64, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(img / "rgba.png")
    (img / "empty.png").write_bytes(b"")
    (img / "corrupt.png").write_bytes(np.random.default_rng(7).integers(0, 256, 500, dtype=np.uint8).tobytes())
    noise(64, 64, 8).save(img / "full.png")
    (img / "truncated.png").write_bytes((img / "full.png").read_bytes()[:3000])
    bomb_png(img / "bomb.png")
    for k in range(6):
        noise([64, 96, 64, 128][k % 4], [64, 64, 96, 64][k % 4], 10 + k).save(img / f"more{k}.png")

    one = lambda name, q="Describe <|image|> briefly.", a="Noise.": {  # noqa: E731
        "conversations": conv(q, a), "image": [f"img/{name}"]}
    items = [
        (GOOD, one("rgb.png")),
        (GOOD, one("gray.png")),
        (GOOD, one("palette.png")),
        (GOOD, one("cmyk.jpg")),
        (GOOD, one("16bit.png")),
        (GOOD, one("exif.jpg")),
        (GOOD, one("rgba.png", q="No marker here, the image goes first.")),
        ("no such file", one("missing.png")),
        ("empty", one("empty.png")),
        ("not an image PIL can identify", one("corrupt.png")),
        ("truncated", one("truncated.png")),
        ("decompression bomb", one("bomb.png")),
        ("2 <|image|> placeholder(s) in the conversation but 1 image(s)",
         one("rgb.png", q="<|image|> and <|image|>")),
        ("unknown role 'robot'", {"conversations": [{"from": "robot", "value": "hi"},
                                                     {"from": "gpt", "value": "x"}]}),
        (GOOD, {"conversations": conv("Text only.", "Fine.", "And more?", "Yes.")}),
        (GOOD, {"conversations": conv("Two: <|image|>", "Here: <|image|> done."),
                "image": ["img/more0.png", str(img / "more1.png")]}),
        ("not a JSON line", None),
    ] + [(GOOD, one(f"more{k}.png", a=f"Noise number {k}.")) for k in range(6)] * 2
    path = d / "data.jsonl"
    with open(path, "w") as f:
        for kind, it in items:
            f.write("{this is not json\n" if it is None else json.dumps(it) + "\n")
    return {"dir": d, "path": path, "kinds": [k for k, _ in items]}


def pretok(dataset_path: Path, out: Path, bundle: Path, *extra: str) -> dict:
    return run(PretokArgs.parse(["--in_filename", str(dataset_path), "--out_dir", str(out), "--tokenizer_dir",
                                 str(bundle), "--target_size", TARGET, "--no_progress", *extra]))


def rank_files(out: Path, r: int = 0, s: int = 1) -> dict[str, bytes]:
    names = ["tokens.bin", "record.jsonl", "errors.jsonl", "run.json", "done.json"]
    return {n: (out / f"{r}-of-{s}-{n}").read_bytes() for n in names}


@pytest.fixture(scope="module")
def reference(dataset, tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    pretok(dataset["path"], out, tiny_bundle, "--batch_size", "8", "--num_workers", "2")
    return out


def test_bad_inputs_land_in_errors_with_readable_reasons_and_good_items_are_kept(dataset, reference, tiny_tokenizer):
    kinds = dataset["kinds"]
    errors = {e["id"]: e for e in map(json.loads, (reference / "0-of-1-errors.jsonl").read_text().splitlines())}
    records = {r.id: r for r in iter_record_file(reference / "0-of-1-record.jsonl")}
    assert set(errors) | set(records) == set(range(len(kinds))) and not set(errors) & set(records)
    for i, kind in enumerate(kinds):
        if kind == GOOD:
            assert i in records, f"good item {i} was rejected: {errors.get(i)}"
        else:
            assert i in errors, f"bad item {i} ({kind}) was not rejected"
            assert kind in errors[i]["error"], errors[i]
            assert errors[i]["error"].startswith(f"data.jsonl line {i + 1}: ")
    assert errors[7]["reason"] == "image" and errors[13]["reason"] == "conversation"
    assert errors[16]["reason"] == "input"
    done = json.loads((reference / "0-of-1-done.json").read_text())
    assert done["records"] == len(records) and done["errors"] == len(errors)
    assert done["errors_by_reason"] == {"conversation": 2, "image": 5, "input": 1}

    reader = ShardReader(reference / "0-of-1-tokens.bin")
    tok = tiny_tokenizer
    # EXIF orientation applied: stored 128x64 (WxH), so the block is taller than wide.
    tokens, _ = reader.read(records[5].offset, records[5].len)
    (s, e), = tok.find_image_blocks(tokens)
    h, w = tok.parse_image_block(tokens[s:e]).shape
    assert h > w
    # Two images, the second in the assistant turn: only its block is labelled.
    tokens, labels = reader.read(records[15].offset, records[15].len)
    (s1, e1), (s2, e2) = tok.find_image_blocks(tokens)
    assert (labels[s1:e1] == IGNORE_INDEX).all() and (labels[s2:e2] == tokens[s2:e2]).all()
    assert tokens[0] == tok.bos_id and labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("batch_size,num_workers", [("1", "0"), ("3", "1")])
def test_output_is_identical_for_any_batch_size_and_num_workers(dataset, reference, tiny_bundle, tmp_path,
                                                                batch_size, num_workers):
    pretok(dataset["path"], tmp_path, tiny_bundle, "--batch_size", batch_size, "--num_workers", num_workers)
    assert rank_files(tmp_path) == rank_files(reference)


def test_output_per_id_is_identical_for_any_splits(dataset, reference, tiny_bundle, tmp_path):
    for r in range(4):
        pretok(dataset["path"], tmp_path, tiny_bundle, "--splits", "4", "--rank", str(r), "--num_workers", "0")
    ref_reader = ShardReader(reference / "0-of-1-tokens.bin")
    ref = {r.id: r for r in iter_record_file(reference / "0-of-1-record.jsonl")}
    got, errors = {}, b""
    for r in range(4):
        reader = ShardReader(tmp_path / f"{r}-of-4-tokens.bin")
        for rec in iter_record_file(tmp_path / f"{r}-of-4-record.jsonl"):
            got[rec.id] = (rec.len, *(a.tobytes() for a in reader.read(rec.offset, rec.len)))
        errors += (tmp_path / f"{r}-of-4-errors.jsonl").read_bytes()
    assert got == {i: (rec.len, *(a.tobytes() for a in ref_reader.read(rec.offset, rec.len)))
                   for i, rec in ref.items()}
    assert errors == (reference / "0-of-1-errors.jsonl").read_bytes()


@pytest.fixture(scope="module")
def long_input(dataset, tmp_path_factory) -> Path:
    """300 good items over the dataset's small images (enough to be killed mid-run)."""
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    img = dataset["dir"] / "img"
    with open(path, "w") as f:
        for i in range(300):
            f.write(json.dumps({"conversations": conv("<|image|> What is it?", f"Noise {i}."),
                                "image": [str(img / f"more{i % 6}.png")]}) + "\n")
    return path


def test_kill9_mid_run_then_rerun_gives_byte_identical_output(long_input, tiny_bundle, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    pretok(long_input, ref, tiny_bundle, "--num_workers", "0")
    cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(long_input), "--out_dir", str(out),
           "--tokenizer_dir", str(tiny_bundle), "--target_size", TARGET, "--no_progress", "--num_workers", "1",
           "--batch_size", "4", "--commit_items", "1", "--threads", "1"]
    rec = out / "0-of-1-record.jsonl"
    killed_at = kill_at_lines(cmd, REPO, rec, (15, 120))
    assert not (out / "0-of-1-done.json").exists() and 0 < killed_at[0] < 300, killed_at
    # the re-run may also use other batch/worker settings: the output does not depend on them
    assert main(["--in_filename", str(long_input), "--out_dir", str(out), "--tokenizer_dir", str(tiny_bundle),
                 "--target_size", TARGET, "--no_progress", "--num_workers", "2"]) == 0
    assert rank_files(out) == rank_files(ref)


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_stop_signal_stops_after_the_item_in_hand_and_the_rerun_is_byte_identical(sig, long_input, tiny_bundle,
                                                                                   tmp_path):
    import signal

    ref, out = tmp_path / "ref", tmp_path / "out"
    pretok(long_input, ref, tiny_bundle, "--num_workers", "0")
    cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(long_input), "--out_dir", str(out),
           "--tokenizer_dir", str(tiny_bundle), "--target_size", TARGET, "--no_progress", "--num_workers", "1",
           "--commit_items", "5", "--threads", "1"]
    rec = out / "0-of-1-record.jsonl"
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None and not (rec.exists() and rec.stat().st_size):
            time.sleep(0.005)
        p.send_signal(getattr(signal, sig))  # to the main process only; its worker is left to it
        log, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 75, log[-3000:]  # EXIT_STOPPED: "stopped, re-run me"
    assert f"stopped by {sig} after id" in log and "re-run the same command to continue at id" in log, log[-2000:]
    assert "Traceback" not in log
    n = rec.read_bytes().count(b"\n")
    assert not (out / "0-of-1-done.json").exists() and 0 < n < 300, n
    assert main(["--in_filename", str(long_input), "--out_dir", str(out), "--tokenizer_dir", str(tiny_bundle),
                 "--target_size", TARGET, "--no_progress", "--num_workers", "0"]) == 0
    assert rank_files(out) == rank_files(ref)


def test_rerun_of_a_finished_rank_does_nothing(dataset, reference, tiny_bundle, caplog):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.iterdir()}
    with caplog.at_level("INFO"):
        assert pretok(dataset["path"], reference, tiny_bundle) == {"already_finished": True}
    assert "already finished" in caplog.text
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.iterdir()} == before


def test_rerun_with_another_target_size_is_refused(dataset, reference, tiny_bundle, caplog):
    assert main(["--in_filename", str(dataset["path"]), "--out_dir", str(reference), "--tokenizer_dir",
                 str(tiny_bundle), "--target_size", "256", "--no_progress"]) == 2
    assert "target_size: 128 there, 256 now" in caplog.text


@pytest.mark.parametrize("content,message", [(None, "file not found"), ("[{'a': 1}", "not a JSON file")])
def test_bad_input_file_fails_at_once_with_a_clear_message(tmp_path, tiny_bundle, caplog, content, message):
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    assert main(["--in_filename", str(path), "--out_dir", str(tmp_path / "out"), "--tokenizer_dir",
                 str(tiny_bundle), "--no_progress"]) == 2
    assert message in caplog.text and str(path) in caplog.text
    assert not (tmp_path / "out").exists()


def test_webdataset_shards_give_the_same_tokens_as_the_same_items_in_json(dataset, tiny_bundle, tmp_path):
    img = dataset["dir"] / "img"
    wds, items = tmp_path / "wds", []
    wds.mkdir()
    for shard, names in (("a-000.tar", ["rgb.png", "gray.png"]), ("a-001.tar", ["exif.jpg"])):
        members = []
        for k, name in enumerate(names):
            key = f"{shard[:-4]}_{k:03d}"
            members += [(f"{key}.{Path(name).suffix[1:]}", (img / name).read_bytes()),
                        (f"{key}.json", json.dumps({"question": f"What is {name}?"}).encode()),
                        (f"{key}.txt", f"It is {name}.\n".encode())]
            items.append({"conversations": conv(f"What is {name}?", f"It is {name}."),
                          "image": [str(img / name)]})
        write_tar(wds / shard, members)
    (tmp_path / "same.json").write_text(json.dumps(items))
    pretok(wds, tmp_path / "o_wds", tiny_bundle, "--num_workers", "1")
    pretok(tmp_path / "same.json", tmp_path / "o_json", tiny_bundle, "--num_workers", "0")
    for name in ("tokens.bin", "record.jsonl"):
        assert (tmp_path / "o_wds" / f"0-of-1-{name}").read_bytes() == (tmp_path / "o_json" / f"0-of-1-{name}").read_bytes()
    assert json.loads((tmp_path / "o_wds" / "0-of-1-done.json").read_text())["records"] == 3


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        PretokArgs.parse(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = PretokArgs.parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    for flag in ("--splits", "--rank", "--in_filename", "--out_dir", "--target_size", "--tokenizer_dir",
                 "--image_root", "--batch_size", "--num_workers", "--device", "--in_format",
                 "--batch_invariant", "--no_batch_invariant", "--progress", "--no_progress"):
        assert flag in text


def test_help_prints_the_examples_pasteable_with_their_line_continuations(capsys):
    with pytest.raises(SystemExit):
        PretokArgs.parse(["-h"])
    text = capsys.readouterr().out
    assert "--target_size 256 \\\n        --tokenizer_dir /tmp/tiny_bundle --device cpu" in text


def test_tokenizer_dir_defaults_to_luminas_ckpts_directory_or_names_it_when_missing(tiny_bundle, tmp_path,
                                                                                   monkeypatch, capsys):
    base = ["--in_filename", "x.json", "--out_dir", "o"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        PretokArgs.parse(base)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ckpts/chameleon/tokenizer does not exist" in err and "--tokenizer_dir" in err
    (tmp_path / "ckpts" / "chameleon").mkdir(parents=True)
    (tmp_path / "ckpts" / "chameleon" / "tokenizer").symlink_to(tiny_bundle)
    assert PretokArgs.parse(base).tokenizer_dir == Path("ckpts/chameleon/tokenizer")
    assert PretokArgs.parse(base + ["--tokenizer_dir", "b"]).tokenizer_dir == Path("b")


def test_rank_and_splits_default_from_slurm_then_torchrun_environment(monkeypatch):
    base = ["--in_filename", "x.json", "--out_dir", "o", "--tokenizer_dir", "b"]
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    a = PretokArgs.parse(base)
    assert (a.rank, a.splits) == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    a = PretokArgs.parse(base)
    assert (a.rank, a.splits) == (2, 4)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    a = PretokArgs.parse(base)
    assert (a.rank, a.splits) == (5, 8)
    a = PretokArgs.parse(base + ["--rank", "1", "--splits", "3"])
    assert (a.rank, a.splits) == (1, 3)
    with pytest.raises(SystemExit):
        PretokArgs.parse(base + ["--rank", "3", "--splits", "3"])


def test_missing_bundle_or_image_root_fails_at_once_with_a_clear_message(dataset, tiny_bundle, tmp_path, caplog):
    base = ["--in_filename", str(dataset["path"]), "--out_dir", str(tmp_path / "out"), "--no_progress"]
    assert main(base + ["--tokenizer_dir", str(tmp_path / "no_bundle")]) == 2
    assert "tokenizer bundle directory" in caplog.text and "make_tiny_bundle" in caplog.text
    assert main(base + ["--tokenizer_dir", str(tiny_bundle), "--image_root", str(tmp_path / "nope")]) == 2
    assert "--image_root" in caplog.text and "not a directory" in caplog.text
    assert not (tmp_path / "out").exists()

"""Video items (PyAV) and --image_fit pad in pre-tokenization: frame choice, tokens, bad videos, invariance."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tar_helper import write_tar
from video_helper import frame_image, frame_index, make_audio_only, make_video

from data.inputs import video as video_mod
from data.image_preprocess import PAD_COLOR, preprocess_image
from data.item_processor import ItemError, ItemProcessor
from data.records import IGNORE_INDEX, ShardReader, iter_record_file
from data.inputs.video import VideoLoadError, VideoSampling, choose_frames, display_transforms, load_video_frames
from pre_tokenize.pre_tokenize import PretokArgs, main, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


def pretok(path: Path, out: Path, bundle: Path, *extra: str) -> dict:
    return run(PretokArgs.parse(["--in_filename", str(path), "--out_dir", str(out), "--tokenizer_dir", str(bundle),
                                 "--target_size", "64", "--video_target_size", "64", "--video_frames", "4",
                                 "--no_progress", *extra]))


def rank_files(out: Path, r: int = 0, s: int = 1) -> dict[str, bytes]:
    return {n: (out / f"{r}-of-{s}-{n}").read_bytes()
            for n in ("tokens.bin", "record.jsonl", "errors.jsonl", "run.json", "done.json")}


# ------------------------------------------------------------------------------------ frame choice


def test_uniform_choice_is_linspace_over_the_frames_first_and_last_included():
    times = [i / 10 for i in range(20)]
    assert choose_frames(times, VideoSampling(frames=5)) == [0, 4, 9, 14, 19]
    assert choose_frames(times, VideoSampling(frames=1)) == [0]
    assert choose_frames(times, VideoSampling(frames=20)) == list(range(20))
    with pytest.raises(VideoLoadError, match="has 20 frame\\(s\\), fewer than the 21 asked"):
        choose_frames(times, VideoSampling(frames=21))


def test_fps_choice_takes_the_frame_shown_at_each_time_and_spreads_when_over_the_cap():
    times = [i / 10 for i in range(20)]  # 10 fps, 2 s
    assert choose_frames(times, VideoSampling(fps=3)) == [0, 3, 6, 10, 13, 16]
    assert choose_frames(times, VideoSampling(fps=30, max_frames=100)) == list(range(20))  # each frame once
    assert choose_frames(times, VideoSampling(fps=30, max_frames=4)) == [0, 6, 12, 19]


@pytest.mark.parametrize("suffix,codec", [(".mp4", "mpeg4"), (".mkv", "ffv1"), (".webm", "libvpx")])
def test_decoded_frames_are_the_chosen_ones_in_time_order(tmp_path, suffix, codec):
    path = make_video(tmp_path / f"clip{suffix}", n=20, codec=codec)
    frames, indices = load_video_frames(path, VideoSampling(frames=5))
    assert indices == [0, 4, 9, 14, 19]
    assert [frame_index(f) for f in frames] == indices
    assert all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    frames, indices = load_video_frames(path.read_bytes(), VideoSampling(fps=3))  # bytes work too
    assert [frame_index(f) for f in frames] == indices == [0, 3, 6, 10, 13, 16]


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".mkv", "mpeg4"), (".webm", "libvpx")])
def test_seeking_to_keyframes_gives_the_frames_decoding_from_the_start_gives(tmp_path, monkeypatch, suffix, codec):
    path = make_video(tmp_path / f"clip{suffix}", n=60, codec=codec, gop=5)
    sampling = VideoSampling(frames=6)
    seeks = []
    real_seek = __import__("av").container.InputContainer.seek
    monkeypatch.setattr("av.container.InputContainer.seek", lambda self, *a, **k: seeks.append(a) or
                        real_seek(self, *a, **k))
    frames, indices = load_video_frames(path, sampling)
    assert len(seeks) >= 4  # 6 frames spread over 12 GOPs: most are reached by a seek
    monkeypatch.setattr(video_mod, "SEEKABLE_FORMATS", ())
    seeks.clear()
    ref, ref_indices = load_video_frames(path, sampling)
    assert not seeks and indices == ref_indices == [0, 11, 23, 35, 47, 59]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, ref))
    assert [frame_index(f) for f in frames] == [round(12 * i % 256 / 12) for i in indices]  # red wraps at 256


def test_a_seek_that_lands_after_its_target_falls_back_to_decoding_from_the_start(tmp_path, monkeypatch):
    path = make_video(tmp_path / "clip.mkv", n=60, codec="mpeg4", gop=5)  # time base 1/1000, 100 per frame
    ref, _ = load_video_frames(path, VideoSampling(frames=6))
    real_seek = __import__("av").container.InputContainer.seek
    monkeypatch.setattr("av.container.InputContainer.seek",
                        lambda self, offset, **k: real_seek(self, offset + 1500, **k))  # a bad index
    frames, _ = load_video_frames(path, VideoSampling(frames=6))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, ref))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("video_media")
    make_video(d / "a.mp4", n=20)
    make_video(d / "b.mkv", n=12, w=48, h=64, codec="ffv1")
    make_video(d / "short.mp4", n=3)
    make_video(d / "long.mp4", n=60)
    full = make_video(d / "full.mkv", n=40, codec="ffv1").read_bytes()
    (d / "truncated.mkv").write_bytes(full[:len(full) * 6 // 10])
    make_audio_only(d / "audio.wav")
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)).save(d / "img.png")
    return {"dir": d}


# ------------------------------------------------------------------------------------------ tokens


def test_a_video_tokenizes_exactly_as_its_frames_given_as_adjacent_images(media, tiny_tokenizer, tmp_path):
    d = media["dir"]
    sampling = VideoSampling(frames=4, target_size=64)
    proc = ItemProcessor(tiny_tokenizer, target_size=64, video=sampling)
    frames, _ = load_video_frames(d / "a.mp4", sampling)
    for k, f in enumerate(frames):
        f.save(tmp_path / f"f{k}.png")  # lossless: the same pixels
    item = {"conversations": conv("Look: <video> and <|image|>, then", "It is <|video|> here."),
            "video": ["a.mp4", "a.mp4"], "image": "img.png"}
    tokens, labels = proc.process_item(item, base_dir=d)
    frame_markers = "<|image|>" * 4
    same = {"conversations": conv(f"Look: {frame_markers} and <|image|>, then", f"It is {frame_markers} here."),
            "image": [str(tmp_path / f"f{k}.png") for k in range(4)] + [str(d / "img.png")]
            + [str(tmp_path / f"f{k}.png") for k in range(4)]}
    assert (tokens, labels) == proc.process_item(same)
    blocks = tiny_tokenizer.find_image_blocks(tokens)
    assert len(blocks) == 9
    # the first video's 4 blocks are back to back, the second's (in the answer) are labelled
    assert all(blocks[k][1] == blocks[k + 1][0] for k in range(3))
    assert all((np.asarray(labels[s:e]) == np.asarray(tokens[s:e])).all() for s, e in blocks[5:])
    assert all((np.asarray(labels[s:e]) == IGNORE_INDEX).all() for s, e in blocks[:5])
    prepared = proc.prepare(item, base_dir=d)
    assert prepared.video_frames == [4, 4]
    assert prepared.image_sources[:2] == [str(d / "a.mp4") + " frame 0", str(d / "a.mp4") + " frame 6"]


def test_videos_without_markers_go_first_and_video_markers_are_plain_text_without_videos(media, tiny_tokenizer):
    d = media["dir"]
    proc = ItemProcessor(tiny_tokenizer, target_size=64, video=VideoSampling(frames=2, target_size=64))
    with_marker = proc.prepare({"conversations": conv("<|video|> <|image|> Hi", "Yes."), "video": "b.mkv",
                                "image": "img.png"}, base_dir=d)
    without = proc.prepare({"conversations": conv("Hi", "Yes."), "video": "b.mkv", "image": "img.png"}, base_dir=d)
    assert without.segments == with_marker.segments and len(without.images) == 3
    text_only = proc.prepare({"conversations": conv("a <video> tag", "Yes.")})
    want = tiny_tokenizer.encode_text("a <video> tag<reserved08706>")
    assert text_only.segments[0][1:1 + len(want)] == want and len(text_only.segments) == 1
    with pytest.raises(ItemError, match="2 <\\|video\\|> .* placeholder\\(s\\) in the conversation but 1 video"):
        proc.prepare({"conversations": conv("<video><video>", "x"), "video": "b.mkv"}, base_dir=d)


def test_pad_keeps_the_whole_image_on_the_mean_colour_and_crop_is_unchanged():
    img = Image.new("RGB", (250, 100), (255, 0, 0))  # 2.5:1 -> 96x32 at target 64: fitted 80x32, padded sides
    pad = preprocess_image(img, 64, fit="pad")
    crop = preprocess_image(img, 64)
    assert pad.shape == crop.shape == (3, 32, 96)
    rgb = np.round((pad.transpose(1, 2, 0).astype(np.float64) + 1) / 2 * 255).astype(int)
    assert tuple(rgb[16, 0]) == tuple(rgb[16, 95]) == PAD_COLOR
    assert tuple(rgb[16, 48]) == tuple(rgb[0, 48]) == tuple(rgb[31, 48]) == (255, 0, 0)  # full height kept
    assert (np.round((crop + 1) / 2 * 255) == np.array([255, 0, 0])[:, None, None]).all()  # crop: all red
    # transparency still goes to white, the padding stays opaque
    rgba = preprocess_image(Image.new("RGBA", (250, 100), (0, 0, 0, 0)), 64, fit="pad")
    rgb = np.round((rgba.transpose(1, 2, 0).astype(np.float64) + 1) / 2 * 255).astype(int)
    assert tuple(rgb[16, 48]) == (255, 255, 255) and tuple(rgb[16, 0]) == PAD_COLOR


# --------------------------------------------------------------------------------- pre_tokenize runs


@pytest.fixture(scope="module")
def video_input(media) -> dict:
    d = media["dir"]
    good = lambda v, q="What happens in <video>?": {"conversations": conv(q, "Colours change."),  # noqa: E731
                                                     "video": v}
    items = [
        ("good", good("a.mp4")),
        ("good", {"conversations": conv("<image>", "A picture.")} | {"image": "img.png"}),
        ("no such file", good("missing.mp4")),
        ("empty file (0 bytes)", good("empty.mp4")),
        ("not a video FFmpeg can open", good("text.mp4")),
        ("truncated", good("truncated.mkv")),
        ("no video stream", good("audio.wav")),
        ("fewer than the 4 asked", good("short.mp4")),
        ("absurdly long", good("long.mp4")),
        ("good", {"conversations": conv("Both <|video|> and <|image|>", "Ok <video>."), "video": ["b.mkv", "a.mp4"],
                  "image": ["img.png"]}),
        ("good", good(["a.mp4"], q="No marker.")),
    ] + [("good", good("b.mkv" if k % 2 else "a.mp4", q=f"Clip {k}: <video>")) for k in range(5)]
    path = d / "videos.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for _, it in items))
    return {"path": path, "kinds": [k for k, _ in items]}


@pytest.fixture(scope="module")
def video_reference(video_input, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_ref")
    mp = pytest.MonkeyPatch()
    mp.setattr(video_mod, "MAX_VIDEO_FRAMES", 50)  # long.mp4 (60 frames) is "absurdly long"; workers fork
    try:
        summary = pretok(video_input["path"], out, tiny_bundle, "--batch_size", "8", "--num_workers", "2")
    finally:
        mp.undo()
    return out, summary


def test_bad_videos_are_rejected_with_their_reason_and_good_items_kept(video_input, video_reference):
    out, summary = video_reference
    errors = {e["id"]: e for e in map(json.loads, (out / "0-of-1-errors.jsonl").read_text().splitlines())}
    records = {r.id: r for r in iter_record_file(out / "0-of-1-record.jsonl")}
    for i, kind in enumerate(video_input["kinds"]):
        if kind == "good":
            assert i in records, errors.get(i)
        else:
            assert errors[i]["reason"] == "video" and kind in errors[i]["error"], errors[i]
            assert errors[i]["error"].startswith(f"videos.jsonl line {i + 1}: video 0 cannot be used: ")
    lines = [json.loads(x) for x in (out / "0-of-1-record.jsonl").read_text().splitlines()]
    assert [x.get("frames") for x in lines] == [[4], None, [4, 4], [4]] + [[4]] * 5
    done = json.loads((out / "0-of-1-done.json").read_text())
    assert (done["videos"], done["frames"], done["video_target_size"], done["video_frames"]) == (9, 36, 64, 4)
    assert summary["errors_by_reason"] == {"video": 7} and summary["images"] == 36 + 2


def test_video_output_is_identical_for_any_batch_size_workers_and_splits(video_input, video_reference,
                                                                        tiny_bundle, tmp_path, monkeypatch):
    ref, _ = video_reference
    monkeypatch.setattr(video_mod, "MAX_VIDEO_FRAMES", 50)
    pretok(video_input["path"], tmp_path / "a", tiny_bundle, "--batch_size", "3", "--num_workers", "0")
    assert rank_files(tmp_path / "a") == rank_files(ref)
    for r in range(2):
        pretok(video_input["path"], tmp_path / "s", tiny_bundle, "--splits", "2", "--rank", str(r),
               "--num_workers", "1", "--batch_size", "5")
    ref_reader = ShardReader(ref / "0-of-1-tokens.bin")
    want = {r.id: [a.tobytes() for a in ref_reader.read(r.offset, r.len)]
            for r in iter_record_file(ref / "0-of-1-record.jsonl")}
    got = {}
    for r in range(2):
        reader = ShardReader(tmp_path / "s" / f"{r}-of-2-tokens.bin")
        got |= {x.id: [a.tobytes() for a in reader.read(x.offset, x.len)]
                for x in iter_record_file(tmp_path / "s" / f"{r}-of-2-record.jsonl")}
    assert got == want


@pytest.mark.slow
def test_kill9_during_a_video_run_then_rerun_gives_byte_identical_output(media, tiny_bundle, tmp_path):
    d = media["dir"]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"conversations": conv(f"Clip {i} <video>", "Colours."),
                                        "video": str(d / ("a.mp4" if i % 3 else "b.mkv"))}) + "\n"
                            for i in range(60)))
    ref, out = tmp_path / "ref", tmp_path / "out"
    pretok(path, ref, tiny_bundle, "--num_workers", "0")
    cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(path), "--out_dir", str(out),
           "--tokenizer_dir", str(tiny_bundle), "--target_size", "64", "--video_target_size", "64",
           "--video_frames", "4", "--no_progress", "--num_workers", "1", "--batch_size", "4",
           "--commit_items", "1", "--threads", "1"]
    rec = out / "0-of-1-record.jsonl"
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if rec.exists() and rec.read_bytes().count(b"\n") >= 10:
                break
            time.sleep(0.005)
    finally:
        p.kill()
        p.wait(timeout=30)
    killed_at = rec.read_bytes().count(b"\n")
    assert not (out / "0-of-1-done.json").exists() and 0 < killed_at < 60, killed_at
    assert main(["--in_filename", str(path), "--out_dir", str(out), "--tokenizer_dir", str(tiny_bundle),
                 "--target_size", "64", "--video_target_size", "64", "--video_frames", "4", "--no_progress",
                 "--num_workers", "2", "--batch_size", "3"]) == 0
    assert rank_files(out) == rank_files(ref)


def test_rerun_with_other_video_or_fit_settings_is_refused(video_input, video_reference, tiny_bundle, caplog):
    ref, _ = video_reference
    base = ["--in_filename", str(video_input["path"]), "--out_dir", str(ref), "--tokenizer_dir", str(tiny_bundle),
            "--target_size", "64", "--video_target_size", "64", "--no_progress"]
    assert main(base + ["--video_frames", "2"]) == 2
    assert "video_frames: 4 there, 2 now" in caplog.text
    assert main(base + ["--video_frames", "4", "--image_fit", "pad"]) == 2
    assert "image_fit: None there, 'pad' now" in caplog.text


def test_absurd_frame_size_is_refused(media, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(VideoLoadError, match="64x48 pixels are absurdly large"):
        load_video_frames(media["dir"] / "a.mp4", VideoSampling())


def test_missing_pyav_names_the_extra_to_install(media, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(VideoLoadError, match=r"pip install -e \.\[video\]"):
        load_video_frames(media["dir"] / "a.mp4", VideoSampling())


# ------------------------------------------------------------------------ rotation, videos inside tars

T = Image.Transpose


@pytest.mark.parametrize("rotation,hflip,upright", [
    (0, False, []), (90, False, [T.ROTATE_90]), (-90, False, [T.ROTATE_270]), (180, False, [T.ROTATE_180]),
    (0, True, [T.FLIP_LEFT_RIGHT]), (90, True, [T.ROTATE_90, T.FLIP_LEFT_RIGHT])])
@pytest.mark.parametrize("suffix,codec", [(".mp4", "mpeg4"), (".webm", "libvpx")])
def test_rotated_videos_come_out_upright(tmp_path, rotation, hflip, upright, suffix, codec):
    path = make_video(tmp_path / f"r{suffix}", n=6, codec=codec, rotation=rotation, hflip=hflip)
    frames, chosen = load_video_frames(path.read_bytes(), VideoSampling(frames=3))
    for img, i in zip(frames, chosen):
        want = Image.fromarray(frame_image(i, 64, 48))
        for t in upright:  # what the display matrix says a player shows: rotated, then mirrored
            want = want.transpose(t)
        assert img.size == want.size
        # lossy coding: a few levels off; the wrong orientation would be ~100 off
        assert np.abs(np.asarray(img, float) - np.asarray(want, float)).mean() < 4


def test_display_matrix_rules_are_ffmpegs():
    def matrix(a, b, c, d):  # 16.16 fixed point, as in the side data
        return [int(a * 65536), int(b * 65536), 0, int(c * 65536), int(d * 65536), 0, 0, 0, 1 << 30]
    assert display_transforms(matrix(1, 0, 0, 1)) == []
    assert display_transforms(matrix(0, -1, 1, 0)) == [T.ROTATE_90]      # "rotate 90" as phones write it
    assert display_transforms(matrix(1, 0, 0, -1)) == [T.FLIP_TOP_BOTTOM]
    assert display_transforms(matrix(0, 1, 1, 0)) == [T.TRANSPOSE]
    assert display_transforms(matrix(0, 0, 0, 0)) == []                   # degenerate: ignored
    angle = np.radians(30)
    assert display_transforms(matrix(np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle))) == [330.0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tar_clips")
    make_video(d / "a.mp4", n=12)
    make_video(d / "b.webm", n=10, w=48, h=64, codec="libvpx", rotation=90)
    return {"dir": d, "items": [("a.mp4", "<video> What happens?", "Red grows."), ("b.webm", "And here?", "Same.")]}


def test_video_members_of_tar_shards_tokenize_like_the_video_files(clips, tiny_bundle, tmp_path):
    d = clips["dir"]
    wds = tmp_path / "wds"
    wds.mkdir()
    write_tar(wds / "000000.tar", [m for k, (name, q, a) in enumerate(clips["items"]) for m in (
        (f"{k:06d}.{name.split('.')[1]}", (d / name).read_bytes()),
        (f"{k:06d}.json", json.dumps({"question": q}).encode()), (f"{k:06d}.txt", a.encode()))])
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"conversations": conv(q, a), "video": str(d / name)}) + "\n"
                           for name, q, a in clips["items"]))
    pretok(ref, tmp_path / "ref", tiny_bundle, "--num_workers", "0")
    pretok(wds, tmp_path / "w", tiny_bundle, "--num_workers", "0")
    want = rank_files(tmp_path / "ref")
    assert json.loads(want["done.json"])["records"] == 2
    assert {k: rank_files(tmp_path / "w")[k] for k in ("tokens.bin", "record.jsonl", "errors.jsonl")} == \
        {k: want[k] for k in ("tokens.bin", "record.jsonl", "errors.jsonl")}
    # the same shard as an energon VidQASample dataset
    pytest.importorskip("megatron.energon")
    from megatron.energon.tools.prepare import command

    en = tmp_path / "en"
    en.mkdir()
    write_tar(en / "000000.tar", [m for k, (name, q, a) in enumerate(clips["items"]) for m in (
        (f"{k:06d}.{name.split('.')[1]}", (d / name).read_bytes()),
        (f"{k:06d}.json", json.dumps({"question": q}).encode()), (f"{k:06d}.txt", a.encode()))])
    command.main([str(en), "--non-interactive", "--num-workers", "1", "--no-progress", "--split-ratio", "1,0,0",
                  "--sample-type", "VidQASample", "--field-map",
                  '{"video": "mp4,webm", "context": "json[question]", "answers": "txt"}'], standalone_mode=False)
    pretok(en, tmp_path / "e", tiny_bundle, "--num_workers", "0")
    assert {k: rank_files(tmp_path / "e")[k] for k in ("tokens.bin", "record.jsonl", "errors.jsonl")} == \
        {k: want[k] for k in ("tokens.bin", "record.jsonl", "errors.jsonl")}


def test_rotated_frames_leave_no_cyclic_garbage_for_a_forked_worker_to_free(tmp_path):
    """PyAV frames whose side data was read are freed by the cyclic GC only; a worker forked while they wait
    hangs or crashes freeing them (seen in the suite), so load_video_frames collects them itself."""
    import gc

    import av

    path = make_video(tmp_path / "r.mp4", n=6, rotation=90)
    gc.collect()
    gc.disable()  # as if no automatic collection came before the next fork
    try:
        load_video_frames(path, VideoSampling(frames=3))
        assert not [o for o in gc.get_objects() if type(o) is av.VideoFrame]
    finally:
        gc.enable()

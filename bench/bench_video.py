"""Benchmark: frames/s of video items against images/s of the same frames given as images.

    python bench/bench_video.py                      # 8 clips x 8 frames, 480x270 H.264, as in bench/RESULTS.md
    python bench/bench_video.py --clips 4 --rounds 2 --tiny

Builds, in a temp dir, ``--clips`` H.264 clips (``--seconds`` long at 25 fps, ``--width`` x ``--height``,
moving smooth noise), a JSONL of video items (one ``<video>`` each), and a JSONL of the same items with
the chosen frames written as PNG files (lossless: the same pixels) behind ``<|image|>`` markers, so both
give identical tokens. Then, interleaved round by round (so the machine's load hits both alike):

  prepare     ``ItemProcessor.prepare`` in this process (CPU side only: decode + frame choice +
              preprocess, text), frames/s of the video items vs images/s of the image items; the
              video items also once with keyframe seeking off (decoding every frame from the start);
  pre_tokenize  the real script in a subprocess (``--num_workers``, VQGAN with Chameleon's real
              architecture and seeded weights, or the tiny bundle's with ``--tiny``), steady rate read
              off its record file as it grows (the first ``--batch_size`` items are a warm-up).

Prints the ratios video/images of the same round and writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from bench_pretokenize import bench_script, make_bundle, rate  # this script's directory is on sys.path
from data.inputs import video as video_module
from data.item_processor import ItemProcessor
from data.inputs.video import VideoSampling, load_video_frames
from model.tokenizer.tiny_bundle import make_tiny_bundle
from model.tokenizer.bundle import ChameleonTokenizer

logger = logging.getLogger("bench_video")
REPO = Path(__file__).resolve().parents[1]


def make_clip(path: Path, seconds: float, w: int, h: int, seed: int, fps: int = 25, gop: int | None = None) -> None:
    """H.264 (yuv420p) clip of smooth noise panning sideways, so frames differ like a real shot."""
    import av

    rng = np.random.default_rng(seed)
    big = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 8, w // 4, 3), dtype=np.uint8))
                     .resize((2 * w, h), Image.Resampling.BICUBIC))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        for i in range(int(seconds * fps)):
            x = (i * 3) % w
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[:, x:x + w]), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_inputs(d: Path, args) -> tuple[Path, Path, list[dict], list[dict]]:
    sampling = VideoSampling(frames=args.frames, target_size=args.video_target_size)
    videos, images = [], []
    for k in range(args.clips):
        clip = d / f"clip{k}.mp4"
        make_clip(clip, args.seconds, args.width, args.height, seed=k, gop=args.gop)
        frames, _ = load_video_frames(clip, sampling)
        names = []
        for j, f in enumerate(frames):
            f.save(d / f"clip{k}_f{j}.png")
            names.append(f"clip{k}_f{j}.png")
        answer = f"Noise drifting sideways, clip {k}."
        videos.append({"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                         {"from": "gpt", "value": answer}], "video": clip.name})
        images.append({"conversations": [{"from": "human", "value": "<|image|>" * len(frames) + "\nWhat happens?"},
                                         {"from": "gpt", "value": answer}], "image": names})
    vpath, ipath = d / "videos.jsonl", d / "frames.jsonl"
    vpath.write_text("".join(json.dumps(x) + "\n" for x in videos))
    ipath.write_text("".join(json.dumps(x) + "\n" for x in images))
    return vpath, ipath, videos, images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="video items (one clip each)")
    parser.add_argument("--frames", type=int, default=8, help="--video_frames")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length (25 fps)")
    parser.add_argument("--width", type=int, default=480, help="clip width")
    parser.add_argument("--height", type=int, default=270, help="clip height")
    parser.add_argument("--gop", type=int, default=None,
                        help="keyframe interval of the clips in frames (default: libx264's, 250)")
    parser.add_argument("--video_target_size", type=int, default=256, help="--video_target_size (and --target_size)")
    parser.add_argument("--batch_size", type=int, default=8, help="pre_tokenize --batch_size")
    parser.add_argument("--num_workers", type=int, default=1, help="pre_tokenize --num_workers")
    parser.add_argument("--threads", type=int, default=0, help="pre_tokenize --threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of each measurement")
    parser.add_argument("--tiny", action="store_true", help="the tiny bundle's VQGAN instead of the real-width one")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "video.json",
                        help="where to write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.target_size = args.video_target_size  # bench_script reads it
    n_frames = args.clips * args.frames

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_tiny_bundle(tmp / "bundle", seed=0) if args.tiny else make_bundle(tmp / "bundle")
        vpath, ipath, videos, images = make_inputs(tmp, args)
        proc = ItemProcessor(ChameleonTokenizer.from_bundle(bundle, load_vqgan=False), args.video_target_size,
                             video=VideoSampling(frames=args.frames, target_size=args.video_target_size))
        flags = ("--video_frames", str(args.frames), "--video_target_size", str(args.video_target_size))
        res: dict[str, list[float]] = {k: [] for k in ("prepare video", "prepare video, no seeking",
                                                       "prepare images", "pre_tokenize video",
                                                       "pre_tokenize images")}
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            order = [("video", videos, vpath), ("images", images, ipath)]
            for name, items, path in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                got = sum(len(proc.prepare(it, tmp).images) for it in items)
                res[f"prepare {name}"].append(got / (time.perf_counter() - t0))
                times, cmd, log = bench_script(path, bundle, tmp / f"out_{name}_{r}", args, *flags)
                # one record per item, each item holds args.frames images: rate per frame
                res[f"pre_tokenize {name}"].append(rate(times, max(1, args.batch_size // args.frames))
                                                   * args.frames)
                logger.info("round %d %s: prepare %.1f frames/s, pre_tokenize %.2f frames/s (%s)", r + 1, name,
                            res[f"prepare {name}"][-1], res[f"pre_tokenize {name}"][-1], log.strip().splitlines()[-1][-160:])
            # the same video items decoded forward from the start of each clip (no keyframe seeking)
            t0 = time.perf_counter()
            with mock.patch.object(video_module, "SEEKABLE_FORMATS", ()):
                got = sum(len(proc.prepare(it, tmp).images) for it in videos)
            res["prepare video, no seeking"].append(got / (time.perf_counter() - t0))
            load.append(os.getloadavg()[0])
        same = all((tmp / f"out_video_{r}" / "0-of-1-tokens.bin").read_bytes()
                   == (tmp / f"out_images_{r}" / "0-of-1-tokens.bin").read_bytes() for r in range(args.rounds))
        logger.info("video items and the same frames as images give identical token shards: %s", same)
        a = {k: np.array(v) for k, v in res.items()}
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "frames_per_run": n_frames, "identical_tokens": same,
                  "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "load_average_per_round": load, "results_per_round": res,
                  "median": {k: float(np.median(v)) for k, v in a.items()},
                  "ratio_video_over_images_per_round": {
                      "prepare": list(a["prepare video"] / a["prepare images"]),
                      "prepare, no seeking": list(a["prepare video, no seeking"] / a["prepare images"]),
                      "pre_tokenize": list(a["pre_tokenize video"] / a["pre_tokenize images"])}}
    for k, v in report["median"].items():
        logger.info("%-22s median %.2f frames/s", k, v)
    for k, v in report["ratio_video_over_images_per_round"].items():
        logger.info("video / images, %s: %s", k, ", ".join(f"{x:.2f}" for x in v))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""Benchmark: images/s of pre_tokenize.py against the bare VQGAN encode and a Lumina-style loop.

    python bench/bench_pretokenize.py                          # 64 images, target 256, as in bench/RESULTS.md
    python bench/bench_pretokenize.py --images 128 --batch_size 16 --num_workers 2 --batched_pipeline

Builds, in a temp dir, a bundle whose VQGAN has Chameleon's real architecture (ch 128, ch_mult 1,1,2,2,4,
2 res blocks, z/embed dim 256, 8192 codes; seeded random weights, bundle format) with the tiny bundle's
text tokenizer, and ``--images`` JPEG photos-sized noise images (``--image_px`` square, so every item
gets the target_size x target_size crop). Then, on the same machine and in this one run:

  bare batched   the preprocessed tensors of all images, encoded ``--batch_size`` at a time
                 (``VQGAN.encode``, channels_last as loaded): the encoder's ceiling;
  bare per-image the same tensors one image per call (what the batch-invariant CPU path does);
  lumina loop    one item at a time in one process, like Lumina's pre_tokenize.py: load + preprocess,
                 encode, assemble, pickle the item to its own .pkl file;
  pre_tokenize   the real script in a subprocess (``--num_workers``, ``--batch_size``), rate read off
                 its record file as it grows; by default (CPU) each image of a batch is encoded alone
                 (batch-invariant codes), and once more with ``--no_batch_invariant`` (whole batches).

Rates are steady state: the first batch of each method is excluded (oneDNN primitive creation, model
loading, worker start-up). The three in-process methods run interleaved, batch by batch in rotating
order, so that other jobs on a shared machine slow them alike; the load average is recorded.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from data.item_processor import ItemProcessor
from model.make_tiny_bundle import make_tiny_bundle
from model.tokenizer_bundle import ChameleonTokenizer
from model.vqgan import VQGAN, VQGANConfig

logger = logging.getLogger("bench_pretokenize")
REPO = Path(__file__).resolve().parents[1]

REAL_WIDTH_VQGAN = VQGANConfig(embed_dim=256, n_embed=8192, z_channels=256, resolution=512, in_channels=3,
                               out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                               attn_resolutions=(), dropout=0.0, double_z=False)


def make_bundle(out: Path, seed: int = 0) -> Path:
    make_tiny_bundle(out, seed=seed)
    torch.manual_seed(seed)
    model = VQGAN(REAL_WIDTH_VQGAN).eval()
    (out / "vqgan.yaml").write_text(yaml.safe_dump(REAL_WIDTH_VQGAN.to_yaml_dict(), sort_keys=False))
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}}, buf)
    (out / "vqgan.ckpt").write_bytes(buf.getvalue())
    return out


def make_images(d: Path, n: int, px: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        # smooth noise compresses like a photo rather than like white noise
        small = rng.integers(0, 256, (px // 8, px // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((px, px), Image.Resampling.BICUBIC).save(d / f"{i:04d}.jpg", quality=90)
        items.append({"conversations": [{"from": "human", "value": f"<|image|> Describe picture {i}."},
                                        {"from": "gpt", "value": f"A smooth noise picture, number {i}."}],
                      "image": [f"{i:04d}.jpg"]})
    path = d / "data.json"
    path.write_text(json.dumps(items))
    return path


def rate(times: list[float], warmup: int) -> float:
    """images/s between the end of image ``warmup`` and the end of the last image; ``times[i]`` is when
    image i was done (images of one batch share a time, so the warmup is moved to a batch boundary)."""
    while warmup < len(times) - 1 and times[warmup] == times[warmup - 1]:
        warmup += 1
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def bare_batched(tok: ChameleonTokenizer, x: torch.Tensor) -> None:
    tok.vqgan.encode(x)


def bare_per_image(tok: ChameleonTokenizer, x: torch.Tensor) -> None:
    for i in range(x.shape[0]):
        tok.vqgan.encode(x[i:i + 1])


def lumina_loop(proc: ItemProcessor, items: list[dict], first_id: int, base: Path, out: Path) -> None:
    """Lumina's pre_tokenize.py loop body: process one item, pickle it to its own file."""
    for k, item in enumerate(items):
        tokens, labels = proc.process_item(item, base)
        with open(out / f"{first_id + k}.pkl", "wb") as f:
            pickle.dump({"token": tokens, "label": labels, "id": first_id + k}, f)


def interleaved(methods: dict, rounds: int) -> dict[str, float]:
    """Runs every method on round k's images before any method on round k+1 (rotating the order), so
    that a change in the machine's load hits all methods alike; round 0 warms up and is not counted."""
    spent = {name: 0.0 for name in methods}
    names = list(methods)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.perf_counter()
            methods[name](k)
            if k:
                spent[name] += time.perf_counter() - t0
        logger.info("round %d/%d done; load average %.2f", k + 1, rounds, os.getloadavg()[0])
    return spent


def bench_script(data: Path, bundle: Path, out: Path, args, *extra: str) -> tuple[list[float], str, str]:
    cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(data), "--out_dir", str(out),
           "--tokenizer_dir", str(bundle), "--target_size", str(args.target_size), "--batch_size",
           str(args.batch_size), "--num_workers", str(args.num_workers), "--device", "cpu", "--commit_items", "1",
           "--threads", str(args.threads), "--no_progress", *extra]
    rec = out / "0-of-1-record.jsonl"
    p = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen: list[float] = []
    while p.poll() is None:
        n = rec.read_bytes().count(b"\n") if rec.exists() else 0
        seen += [time.perf_counter()] * (n - len(seen))
        time.sleep(0.02)
    n = rec.read_bytes().count(b"\n")
    seen += [time.perf_counter()] * (n - len(seen))
    log = p.stderr.read()
    if p.returncode:
        raise RuntimeError(f"pre_tokenize failed:\n{log}")
    return seen, " ".join(cmd[1:]), log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="number of images (one per item)")
    parser.add_argument("--image_px", type=int, default=384, help="side of the square JPEG inputs")
    parser.add_argument("--target_size", type=int, default=256, help="pre_tokenize --target_size")
    parser.add_argument("--batch_size", type=int, default=8, help="VQGAN batch for bare batched and pre_tokenize")
    parser.add_argument("--num_workers", type=int, default=1, help="pre_tokenize --num_workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every method (0: torch's default)")
    parser.add_argument("--batched_pipeline", action="store_true",
                        help="also run pre_tokenize with --no_batch_invariant (whole batches per VQGAN call)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pretokenize.json",
                        help="where to write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.images < 3 * args.batch_size:
        parser.error("--images must be at least 3 * --batch_size (the first batch is a warm-up)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp / "bundle")
        data = make_images(tmp, args.images, args.image_px)
        items = json.loads(data.read_text())
        tok = ChameleonTokenizer.from_bundle(bundle)
        proc = ItemProcessor(tok, args.target_size)
        pixels = [im for it in items for im in proc.prepare(it, tmp).images]
        logger.info("%d images preprocessed to %s; torch %s, %d threads, channels_last=%s", len(pixels),
                    pixels[0].shape, torch.__version__, torch.get_num_threads(), tok.vqgan.channels_last)
        if args.threads:
            torch.set_num_threads(args.threads)
        (tmp / "lumina").mkdir()
        b = args.batch_size
        x = torch.from_numpy(np.stack(pixels))
        methods = {"bare batched": lambda k: bare_batched(tok, x[k * b:(k + 1) * b]),
                   "bare per-image": lambda k: bare_per_image(tok, x[k * b:(k + 1) * b]),
                   "lumina loop": lambda k: lumina_loop(proc, items[k * b:(k + 1) * b], k * b, tmp, tmp / "lumina")}
        load = {"before": os.getloadavg()[0]}
        spent = interleaved(methods, len(items) // b)
        counted = (len(items) // b - 1) * b
        results = {name: {"images_per_s": counted / t, "seconds": t} for name, t in spent.items()}
        load["after in-process methods"] = os.getloadavg()[0]
        runs = [("pre_tokenize", ())] + ([("pre_tokenize --no_batch_invariant", ("--no_batch_invariant",))]
                                         if args.batched_pipeline else [])
        for name, extra in runs:
            t0 = time.perf_counter()
            times, cmd, log = bench_script(data, bundle, tmp / name.replace(" ", "_"), args, *extra)
            results[name] = {"images_per_s": rate(times, b), "seconds": time.perf_counter() - t0,
                             "command": cmd, "summary": log.strip().splitlines()[-1]}
            load[f"after {name}"] = os.getloadavg()[0]
        for name, r in results.items():
            logger.info("%-34s %.3f images/s (steady)", name, r["images_per_s"])

    base = results["bare batched"]["images_per_s"]
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": load,
              "results": results,
              "pre_tokenize_vs_bare_batched": results["pre_tokenize"]["images_per_s"] / base,
              "pre_tokenize_vs_lumina_loop": results["pre_tokenize"]["images_per_s"]
              / results["lumina loop"]["images_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("| method | images/s (steady) | vs bare batched |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['images_per_s']:.3f} | {r['images_per_s'] / base:.2f}x |")
    print(f"\npre_tokenize / lumina loop = {report['pre_tokenize_vs_lumina_loop']:.2f}x; written {args.out}")


if __name__ == "__main__":
    main()

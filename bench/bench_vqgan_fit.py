"""Benchmark: how well the tiny VQGAN fitted to the demo's shapes reconstructs pictures it never saw, and its cost.

    python bench/bench_vqgan_fit.py                      # the demo's fit (make_tiny_bundle --fit_images)
    python bench/bench_vqgan_fit.py --steps 200 --images 64

Draws ``--images`` demo pictures (exps/make_demo_data.py, seed 0: what the demo fits to) and fits the tiny
bundle's VQGAN to them through ``make_tiny_bundle`` (what ``--fit_images`` runs). Held out: every demo
picture (colour x shape x background x size) that is not among the fitted ones. Each held-out picture
goes through the bundle as loaded by the normal loader (``load_vqgan``: fast CPU encoder, then the
decoder) and its PSNR (pixels in [0, 1]) is reported, mean and worst, for the fitted VQGAN and for the
unfitted one of the same seed (the baseline). The fit's wall time and this process's CPU seconds are
printed with the load average: on a shared machine the wall time is what the other jobs leave, the CPU
seconds divided by the threads used are the best estimate of an idle machine's wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.tokenizer.tiny_bundle import make_tiny_bundle
from model.tokenizer.vqgan import load_vqgan
from model.tokenizer.vqgan_fit import FitConfig

REPO = Path(__file__).resolve().parents[1]


def _demo_data():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "exps" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_demo_data"] = mod
    spec.loader.exec_module(mod)
    return mod


def psnr_of(bundle: Path, pictures) -> list[float]:
    vq = load_vqgan(bundle / "vqgan.yaml", bundle / "vqgan.ckpt", device="cpu")
    out = []
    for img in pictures:
        x = torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        y = vq.decode(vq.encode(x))
        mse = float(((y - x) ** 2).mean()) / 4  # [-1, 1] -> [0, 1]
        out.append(10 * math.log10(1 / max(mse, 1e-12)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="demo pictures to fit to (the demo's N_IMAGES)")
    p.add_argument("--steps", type=int, default=FitConfig.steps, help="fit steps (make_tiny_bundle --fit_steps)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    demo = _demo_data()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo.make_demo_data(tmp / "data", a.images, 0)
        seen = set()
        for item in __import__("json").loads((tmp / "data" / "caption.json").read_text()):
            seen.add(item["conversations"][1]["value"] + str(demo.Image.open(tmp / "data" / item["image"][0]).size))
        held = [s for s in (demo.ShapeSpec(c, sh, b, size) for c, sh, b, size in itertools.product(
            sorted(demo.COLOURS), demo.SHAPES, sorted(demo.BACKGROUNDS), demo.SIZES))
            if s.caption + str(s.size) not in seen]
        pictures = [demo.draw(s) for s in held]
        print(f"fit to {a.images} pictures ({len(seen)} distinct); {len(held)} held-out pictures; "
              f"torch threads {torch.get_num_threads()}; load average before {os.getloadavg()[0]:.1f}")
        base = make_tiny_bundle(tmp / "unfitted", seed=a.seed)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fitted = make_tiny_bundle(tmp / "fitted", seed=a.seed, fit_images=tmp / "data" / "images",
                                  fit=FitConfig(steps=a.steps), progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(f"fit: {a.steps} steps in {wall:.1f} s wall, {cpu:.1f} s CPU of this process "
              f"({cpu / torch.get_num_threads():.1f} s per thread); load average after {os.getloadavg()[0]:.1f}")
        for name, bundle in (("unfitted (seeded random)", base), ("fitted", fitted)):
            ps = psnr_of(bundle, pictures)
            print(f"{name:>26}: held-out PSNR mean {np.mean(ps):.1f} dB, worst {min(ps):.1f} dB, "
                  f">= 20 dB: {sum(v >= 20 for v in ps)}/{len(ps)}")


if __name__ == "__main__":
    main()

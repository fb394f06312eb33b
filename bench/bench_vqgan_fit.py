"""Benchmark: how well the tiny VQGAN fitted to the demo's shapes reconstructs pictures it never saw, and its cost.

    python bench/bench_vqgan_fit.py                      # the demo's fit (make_tiny_bundle --fit_images)
    python bench/bench_vqgan_fit.py --images 12          # fitted to 12 pictures: most of the 32 held out
    python bench/bench_vqgan_fit.py --sizes 128x128,192x128,128x192,256x128 --images 128

Draws ``--images`` demo pictures at ``--sizes`` (exps/make_demo_data.py, seed 0: what the demo fits to) and
fits the tiny bundle's VQGAN to them through ``make_tiny_bundle`` (what ``--fit_images`` runs). Every demo
picture (colour x shape x background x size) is then either fitted (among those drawn) or held out. Each goes
through the bundle as loaded by the normal loader (``load_vqgan``: fast CPU encoder, then the decoder); per
group the PSNR (pixels in [0, 1]) is reported, mean and worst, and how many reconstructions
exps/score_demo.py's classifier reads as the picture's colour, shape and background, for the fitted VQGAN
and for the unfitted one of the same seed (the baseline). The fit's wall time and this process's CPU seconds are
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
from PIL import Image

from model.tokenizer.tiny_bundle import make_tiny_bundle
from model.tokenizer.vqgan import load_vqgan
from model.tokenizer.vqgan_fit import FitConfig

REPO = Path(__file__).resolve().parents[1]


def _exps(name: str):
    """A script of exps/ as a module (score_demo imports make_demo_data by name: load that one first)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "exps" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def reconstruct(bundle: Path, pictures, specs, classify) -> tuple[list[float], int]:
    """PSNR of each picture through encode and decode (pixels in [0, 1]), and how many reconstructions
    exps/score_demo.py's classifier reads as their picture (colour, shape and background)."""
    vq = load_vqgan(bundle / "vqgan.yaml", bundle / "vqgan.ckpt", device="cpu")
    psnrs, right = [], 0
    for img, spec in zip(pictures, specs):
        x = torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        y = vq.decode(vq.encode(x))
        mse = float(((y - x) ** 2).mean()) / 4  # [-1, 1] -> [0, 1]
        psnrs.append(10 * math.log10(1 / max(mse, 1e-12)))
        rgb = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        seen = classify(Image.fromarray(rgb))
        right += (seen.colour, seen.shape, seen.background) == (spec.colour, spec.shape, spec.background)
    return psnrs, right


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="demo pictures to fit to (the demo's N_IMAGES)")
    p.add_argument("--sizes", default="128x128", help="picture sizes drawn (the demo's SIZES; comma-separated WxH)")
    p.add_argument("--steps", type=int, default=FitConfig.steps, help="fit steps (make_tiny_bundle --fit_steps)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    demo, score = _exps("make_demo_data"), _exps("score_demo")
    try:
        sizes = demo.parse_sizes(a.sizes)
    except ValueError as e:
        p.error(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo.make_demo_data(tmp / "data", a.images, 0, sizes)
        fitted_keys = set()
        for item in __import__("json").loads((tmp / "data" / "caption.json").read_text()):
            fitted_keys.add(item["conversations"][1]["value"] + str(demo.Image.open(tmp / "data" / item["image"][0]).size))
        every = [demo.ShapeSpec(c, sh, b, size) for c, sh, b, size in itertools.product(
            sorted(demo.COLOURS), demo.SHAPES, sorted(demo.BACKGROUNDS), sizes)]
        groups = {"fitted": [s for s in every if s.caption + str(s.size) in fitted_keys],
                  "held-out": [s for s in every if s.caption + str(s.size) not in fitted_keys]}
        print(f"fit to {a.images} pictures at {a.sizes} ({len(groups['fitted'])} distinct); "
              f"{len(groups['held-out'])} held-out pictures; torch threads {torch.get_num_threads()}; "
              f"load average before {os.getloadavg()[0]:.1f}")
        base = make_tiny_bundle(tmp / "unfitted", seed=a.seed)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fitted = make_tiny_bundle(tmp / "fitted", seed=a.seed, fit_images=tmp / "data" / "images",
                                  fit=FitConfig(steps=a.steps), progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(f"fit: {a.steps} steps in {wall:.1f} s wall, {cpu:.1f} s CPU of this process "
              f"({cpu / torch.get_num_threads():.1f} s per thread); load average after {os.getloadavg()[0]:.1f}")
        for name, bundle in (("unfitted (seeded random)", base), ("fitted", fitted)):
            for group, specs in groups.items():
                if not specs:
                    continue
                ps, right = reconstruct(bundle, [demo.draw(s) for s in specs], specs, score.classify)
                print(f"{name:>26}, {group:>8} pictures: PSNR mean {np.mean(ps):.1f} dB, worst {min(ps):.1f} dB, "
                      f">= 20 dB: {sum(v >= 20 for v in ps)}/{len(ps)}; read back right (score_demo's "
                      f"classifier): {right}/{len(specs)}")


if __name__ == "__main__":
    main()

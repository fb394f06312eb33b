"""Writes a small synthetic, learnable image-text data set in Lumina's JSON format, for the demo.

    python exps/make_demo_data.py --out output/demo/data --n 96 --seed 0

Each item is one coloured shape (circle, square, triangle, ...) on a plain background, drawn at one
of several aspect ratios. Two conversation files are written, both Lumina JSON lists:

- ``caption.json``: the human shows the image and asks for a caption; the assistant names colour,
  shape and background ("A red circle on a white background.").
- ``t2i.json``: the human asks for that picture; the assistant answers with ``<|image|>``, so the
  image block is what is learned (text-to-image).

The same arguments write byte-identical files, so re-running the demo is safe.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ((128, 128), (192, 128), (128, 192), (256, 128))  # several aspect ratios


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    background: str
    size: tuple[int, int]

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape} on a {self.background} background."


def draw(spec: ShapeSpec) -> Image.Image:
    w, h = spec.size
    img = Image.new("RGB", spec.size, BACKGROUNDS[spec.background])
    d = ImageDraw.Draw(img)
    r = min(w, h) * 0.35
    cx, cy = w / 2, h / 2
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'128x128,192x128' -> ((128, 128), (192, 128)); ValueError unless every entry is WxH with sides >= 16."""
    try:
        sizes = tuple(tuple(int(v) for v in wh.split("x")) for wh in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or not all(len(wh) == 2 and min(wh) >= 16 for wh in sizes):
        raise ValueError(f"--sizes {text!r}: expected WxH[,WxH...], e.g. 128x128,192x128 (sides >= 16)")
    return sizes


def make_demo_data(out: Path, n: int, seed: int,
                   sizes: tuple[tuple[int, int], ...] = SIZES) -> tuple[Path, Path]:
    rng = random.Random(seed)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    captions, t2i = [], []
    for i in range(n):
        spec = ShapeSpec(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(sorted(BACKGROUNDS)),
                         rng.choice(sizes))
        name = f"images/{i:05d}.png"
        draw(spec).save(out / name, optimize=False)
        captions.append({"conversations": [
            {"from": "human", "value": "<|image|>What is in this picture?"},
            {"from": "gpt", "value": spec.caption}], "image": [name]})
        t2i.append({"conversations": [
            {"from": "human", "value": f"Draw this: {spec.caption}"},
            {"from": "gpt", "value": "<|image|>"}], "image": [name]})
    paths = out / "caption.json", out / "t2i.json"
    for path, items in zip(paths, (captions, t2i)):
        path.write_text(json.dumps(items, indent=1) + "\n")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory to write images/ and the two JSON files into")
    p.add_argument("--n", type=int, default=96, help="number of images (each gives one caption and one t2i item)")
    p.add_argument("--seed", type=int, default=0, help="seed for the shapes, colours and sizes")
    p.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES),
                   help="comma-separated WxH picture sizes to draw from (default: all of SIZES)")
    args = p.parse_args()
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        p.error(str(e))
    for path in make_demo_data(args.out, args.n, args.seed, sizes):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Draws the loss curve of a training run from its metrics.jsonl into a PNG (Pillow only).

    python exps/plot_loss.py output/demo/train/metrics.jsonl --out output/demo/loss.png

One point per logged step; when a run was resumed, repeated steps keep the last value logged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

W, H, MARGIN = 640, 400, 50


def read_losses(path: Path, key: str) -> list[tuple[int, float]]:
    by_step: dict[int, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = float(row[key])
    return sorted(by_step.items())


def plot(points: list[tuple[int, float]], out: Path, title: str) -> None:
    if not points:
        raise SystemExit("no logged steps to plot")
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = [s for s, _ in points]
    vals = [v for _, v in points]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    v0, v1 = min(vals), max(max(vals), min(vals) + 1e-6)

    def xy(s: float, v: float) -> tuple[float, float]:
        return (MARGIN + (s - s0) / (s1 - s0) * (W - 2 * MARGIN),
                H - MARGIN - (v - v0) / (v1 - v0) * (H - 2 * MARGIN))

    d.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    # Dots for the logged steps, a line for their running mean: a global batch holds one data type,
    # so consecutive steps of a mixed data config can differ a lot (captions vs image tokens).
    for s, v in points:
        x, y = xy(s, v)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(120, 150, 220))
    window = max(1, len(points) // 10)
    smooth = [(s, sum(vals[max(0, i - window + 1):i + 1]) / len(vals[max(0, i - window + 1):i + 1]))
              for i, s in enumerate(steps)]
    d.line([xy(s, v) for s, v in smooth], fill=(200, 40, 40), width=2)
    d.text((MARGIN, 15), title, fill="black")
    d.text((5, MARGIN - 5), f"{v1:.3g}", fill="black")
    d.text((5, H - MARGIN - 5), f"{v0:.3g}", fill="black")
    d.text((MARGIN, H - MARGIN + 8), f"step {s0}", fill="black")
    d.text((W - MARGIN - 60, H - MARGIN + 8), f"step {s1}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, help="metrics.jsonl written by finetune_solver.py")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--key", default="loss", help="which metric to plot (loss, closs, z_loss, lr, ...)")
    args = p.parse_args()
    points = read_losses(args.metrics, args.key)
    plot(points, args.out, f"{args.key}: {points[0][1]:.3f} -> {points[-1][1]:.3f} over {len(points)} logged steps")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

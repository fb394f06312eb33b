"""Scores the demo's model on what its data teaches: does it draw what it is asked, does it say what it sees?

    # text-to-image samples (generate.py --prompts_file ... --out DIR) and greedy captions of fresh pictures
    python exps/score_demo.py --t2i output/demo/generated/images \
        --captions output/demo/generated/caption --truth output/demo/fresh/caption.json
    python exps/score_demo.py --classify some_picture.png     # what the classifier sees in one picture

Pictures are classified with plain pixel statistics, no model: the background is the border's median colour
(nearest of ``BACKGROUNDS``), the foreground the pixels far from it, its colour the median of those pixels
(nearest of ``COLOURS``; a foreground of no one colour, e.g. noise, is no shape), and its shape the one of ``SHAPES`` whose mask, as ``draw`` makes it, overlaps the
foreground mask best once both are cropped to their bounding boxes and scaled to one size (so position and
size do not matter, the outline and its proportions do). A text-to-image sample is right in colour / shape / background when the
classified picture agrees with its prompt ("A red circle on a white background."); a caption is exact when it
names the true colour, shape and background.

Prints e.g. ``text-to-image: colour 31/32, shape 27/32, background 32/32; captions 22/24 exact``, writes the
per-item verdicts to ``--out`` (JSON) if given, and exits 1 when a score is below its floor (``--min_*``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from make_demo_data import BACKGROUNDS, COLOURS, SHAPES, ShapeSpec, draw  # beside this script (exps/)

CAPTION_RE = re.compile(r"\b(?:An?|a|an)\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\b")
MASK_SIDE = 48           # foreground masks are compared at this size
FOREGROUND_DIST = 90.0   # RGB distance from the background above which a pixel is foreground
COHERENT = 0.6          # a foreground counts as one coloured shape when this share of it is near its median colour
FLOORS = {"colour": 0.90, "shape": 0.75, "background": 0.90, "captions": 0.85}


@dataclass(frozen=True)
class Seen:
    """What the classifier sees in a picture (None where it sees nothing: e.g. no foreground)."""

    colour: str | None
    shape: str | None
    background: str
    foreground: float   # fraction of pixels that are foreground
    shape_iou: float    # overlap of the foreground with the best shape's mask


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """'A red circle on a white background.' -> ('red', 'circle', 'white'); None when it does not read so."""
    m = CAPTION_RE.search(text or "")
    return (m.group(1).lower(), m.group(2).lower(), m.group(3).lower()) if m else None


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = sorted(palette)
    d = [float(np.sum((rgb - np.asarray(palette[n], np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def _normalised_mask(mask: np.ndarray) -> np.ndarray | None:
    """The mask cropped to its robust bounding box (1st..99th percentile of rows and columns), centred in a
    square of the box's longer side (so a rectangle stays a rectangle) and scaled to MASK_SIDE^2."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 16:
        return None
    y0, y1 = np.percentile(ys, [1, 99]).astype(int)
    x0, x1 = np.percentile(xs, [1, 99]).astype(int)
    crop = mask[y0:y1 + 1, x0:x1 + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), bool)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    im = Image.fromarray(square.astype(np.uint8) * 255).resize((MASK_SIDE, MASK_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(im) >= 128


_TEMPLATES: dict[str, np.ndarray] = {}


def shape_templates() -> dict[str, np.ndarray]:
    """Each shape's normalised mask, drawn by ``draw`` (large, so its outline is clean)."""
    if not _TEMPLATES:
        for shape in SHAPES:
            img = np.asarray(draw(ShapeSpec("red", shape, "black", (256, 256))), np.float32)
            mask = np.sqrt(((img - np.asarray(BACKGROUNDS["black"], np.float32)) ** 2).sum(-1)) > FOREGROUND_DIST
            _TEMPLATES[shape] = _normalised_mask(mask)
    return _TEMPLATES


def classify(img: Image.Image) -> Seen:
    """Background, colour and shape of one picture (see the module docstring)."""
    a = np.asarray(img.convert("RGB"), np.float32)
    h, w, _ = a.shape
    b = max(1, min(h, w) // 32)  # border ring a few pixels wide
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    mask = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DIST
    frac = float(mask.mean())
    if mask.sum() < 16:
        return Seen(None, None, background, frac, 0.0)
    fg_rgb = np.median(a[mask], axis=0)
    if float((np.sqrt(((a[mask] - fg_rgb) ** 2).sum(-1)) < FOREGROUND_DIST / 2).mean()) < COHERENT:
        return Seen(None, None, background, frac, 0.0)  # no one colour: noise or a smear, not a shape
    colour = _nearest(fg_rgb, COLOURS)
    norm = _normalised_mask(mask)
    best, best_iou = None, 0.0
    if norm is not None:
        for shape, tmpl in shape_templates().items():
            iou = float((norm & tmpl).sum() / max(1, (norm | tmpl).sum()))
            if iou > best_iou:
                best, best_iou = shape, iou
    return Seen(colour, best, background, frac, best_iou)


@dataclass
class Score:
    right: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.right += int(ok)
        self.total += 1

    @property
    def rate(self) -> float:
        return self.right / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.right}/{self.total}"


def _rows(gen_dir: Path) -> list[dict]:
    path = gen_dir / "generations.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (the --out of a generate.py run)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_t2i(gen_dir: Path) -> tuple[dict[str, Score], list[dict]]:
    """Classifies each generated image against the colour, shape and background its prompt asks for."""
    scores = {k: Score() for k in ("colour", "shape", "background")}
    verdicts = []
    for row in _rows(gen_dir):
        want = parse_caption(row["prompt"])
        if want is None or not row.get("images"):
            continue
        seen = classify(Image.open(gen_dir / row["images"][0]))
        got = (seen.colour, seen.shape, seen.background)
        for k, w, g in zip(scores, want, got):
            scores[k].add(w == g)
        verdicts.append({"image": row["images"][0], "prompt": row["prompt"], "want": want, "seen": asdict(seen)})
    return scores, verdicts


def score_captions(gen_dir: Path, truth: Path) -> tuple[Score, list[dict]]:
    """Compares each generated answer with the true caption of its picture (``truth``: Lumina JSON with answers)."""
    items = json.loads(truth.read_text())
    score, verdicts = Score(), []
    for row in _rows(gen_dir):
        true_text = items[row["prompt_index"]]["conversations"][-1]["value"]
        want = parse_caption(true_text)
        ok = want is not None and parse_caption(row["text"]) == want
        score.add(ok)
        verdicts.append({"index": row["prompt_index"], "text": row["text"], "truth": true_text, "exact": ok})
    return score, verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t2i", type=Path, help="generate.py --out folder of text-to-image samples (prompts name "
                                            "colour, shape and background)")
    p.add_argument("--captions", type=Path, help="generate.py --out folder of answers to --truth's pictures")
    p.add_argument("--truth", type=Path, help="Lumina JSON with the true captions (make_demo_data's caption.json), "
                                              "in the order the answers were generated")
    p.add_argument("--classify", type=Path, nargs="*", default=[], help="print what is seen in these pictures")
    p.add_argument("--out", type=Path, help="write the scores and per-item verdicts here (JSON)")
    for k, v in FLOORS.items():
        p.add_argument(f"--min_{k}", type=float, default=v, help=f"floor for the {k} score as a fraction (default {v}); "
                                                                 f"0 reports without failing")
    a = p.parse_args(argv)
    if a.captions and not a.truth:
        p.error("--captions needs --truth (the true captions)")
    for path in a.classify:
        print(f"{path}: {asdict(classify(Image.open(path)))}")
    report, parts, failed = {}, [], []
    if a.t2i:
        t2i, verdicts = score_t2i(a.t2i)
        parts.append("text-to-image: " + ", ".join(f"{k} {s}" for k, s in t2i.items()))
        report["t2i"] = {k: {"right": s.right, "total": s.total} for k, s in t2i.items()}
        report["t2i_items"] = verdicts
        failed += [f"{k} {s.rate:.0%} < {getattr(a, 'min_' + k):.0%}" for k, s in t2i.items()
                   if s.rate < getattr(a, "min_" + k) or not s.total]
    if a.captions:
        cap, verdicts = score_captions(a.captions, a.truth)
        parts.append(f"captions {cap} exact")
        report["captions"] = {"right": cap.right, "total": cap.total}
        report["caption_items"] = verdicts
        if cap.rate < a.min_captions or not cap.total:
            failed.append(f"captions {cap.rate:.0%} < {a.min_captions:.0%}")
    if parts:
        print("; ".join(parts))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    if failed:
        print("below the floors: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

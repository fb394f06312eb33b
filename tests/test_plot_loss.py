"""exps/plot_loss.py: per-type curves, validation points, learning-rate panel, several runs, a clear error
without matplotlib."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plot_loss():
    spec = importlib.util.spec_from_file_location("plot_loss", REPO / "exps" / "plot_loss.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(path: Path, scale: float = 1.0) -> Path:
    """A mixed run as the demo's: captions near 0.1, text-to-image near 4.7, alternating; a resume repeats 5."""
    rows = []
    for s in range(1, 21):
        t = "caption" if s % 3 else "t2i"
        loss = scale * (0.1 + math.exp(-s / 5) if t == "caption" else 4.7 + math.exp(-s / 8))
        r = {"step": s, "lr": 1e-3 * min(1.0, s / 4), "loss": loss, "type": t, f"loss/{t}": loss * 1.01}
        if s % 10 == 0:
            r.update({"val_loss": 2.0, "val_loss/caption": 0.2, "val_loss/t2i": 4.8})
        rows.append(r)
    rows.insert(4, {**rows[4], "loss": 99.0})  # an earlier line for step 5 (before a resume): the last one wins
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_one_curve_per_type_with_validation_points_and_an_lr_panel_for_several_runs(plot_loss, tmp_path):
    a, b = write_run(tmp_path / "full" / "metrics.jsonl"), write_run(tmp_path / "lora" / "metrics.jsonl", 1.2)
    out = tmp_path / "cmp.png"
    plot_loss.main([str(a), str(b), "--labels", "full", "lora", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = plot_loss.read_rows(a)
    fig = plot_loss.plot([("full", rows), ("lora", plot_loss.read_rows(b))], tmp_path / "again.png")
    top, lr = fig.axes
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels == [f"{run}: {t}{v}" for run in ("full", "lora") for t in ("caption", "t2i")
                      for v in ("", " (validation)")]
    assert top.get_yscale() == "log"  # 0.1 vs 4.7: both readable
    assert lr.get_xlabel() == "optimizer step" and lr.get_ylabel() == "learning rate" and top.get_ylabel()
    assert [t.get_text() for t in lr.get_legend().get_texts()] == ["full", "lora"]
    caption_line = next(ln for ln in top.get_lines() if ln.get_label() == "full: caption")
    want = [r for r in rows if r["type"] == "caption"]
    assert list(caption_line.get_xdata()) == [r["step"] for r in want]
    assert list(caption_line.get_ydata()) == [r["loss/caption"] for r in want]  # the trainer's running mean
    assert max(max(ln.get_ydata()) for ln in top.get_lines()) < 99  # the replaced row of step 5 is not drawn


def test_rows_without_types_are_one_curve_with_a_windowed_mean(plot_loss, tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps({"step": s, "lr": 0.1, "loss": float(s)}) + "\n" for s in range(1, 6)))
    s = plot_loss.series(plot_loss.read_rows(path), "loss", window=2)
    assert list(s) == ["all"] and s["all"]["running"] == [1.0, 1.5, 2.5, 3.5, 4.5]


def test_without_matplotlib_the_error_names_the_plots_extra(plot_loss, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install -e \.\[plots\]"):
        plot_loss.main([str(write_run(tmp_path / "m.jsonl")), "--out", str(tmp_path / "x.png")])

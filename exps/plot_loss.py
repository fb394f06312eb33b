"""Draws the loss curves of one or more training runs from their metrics.jsonl into a PNG (matplotlib, Agg).

    python exps/plot_loss.py output/demo/train/metrics.jsonl --out output/demo/loss.png
    python exps/plot_loss.py runA/metrics.jsonl runB/metrics.jsonl --labels full lora --out compare.png

Top panel: one colour per data-config type (a global batch holds one type, and in a mixed run the types'
losses can differ 40x, so one curve would zigzag): dots are the logged steps, the line is the running loss
of that type (``loss/{type}`` of metrics.jsonl: the mean of the last --type_loss_window steps of the type;
for another --key, or rows written before the trainer logged types, the same windowed mean of the dots).
``val_loss/{type}`` (validation, --val_data_config) is drawn with squares. Bottom panel: the learning rate.
Several runs share the figure, told apart by line style and by the labels in the legend. The y axis is
logarithmic when the values span more than 20x (``--yscale`` to choose). When a run was resumed, a
repeated step keeps the last row logged. Needs matplotlib: ``pip install -e .[plots]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLES = ["-", "--", ":", "-."]


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, one per step (the last one logged wins), in step order."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    by_step[int(row["step"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise SystemExit(f"{path} line {n}: not a metrics row ({e})") from None
    return [by_step[s] for s in sorted(by_step)]


def _running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def series(rows: list[dict], key: str, window: int) -> dict[str, dict[str, list]]:
    """Per type: steps and values of ``key`` (dots), its running mean (line), and the validation points."""
    out: dict[str, dict[str, list]] = {}
    for r in rows:
        if key in r:
            t = str(r.get("type", "all"))
            s = out.setdefault(t, {"step": [], "value": [], "running": [], "val_step": [], "val": []})
            s["step"].append(r["step"])
            s["value"].append(float(r[key]))
            s["running"].append(r.get(f"loss/{t}") if key == "loss" else None)
    for t, s in out.items():
        if any(v is None for v in s["running"]):
            s["running"] = _running_mean(s["value"], window)
    if key == "loss":
        for r in rows:
            for k, v in r.items():
                if k.startswith("val_loss/"):
                    s = out.setdefault(k.split("/", 1)[1], {"step": [], "value": [], "running": [], "val_step": [],
                                                            "val": []})
                    s["val_step"].append(r["step"])
                    s["val"].append(float(v))
    return out


def plot(runs: list[tuple[str, list[dict]]], out: Path, *, key: str = "loss", window: int = 10,
         yscale: str = "auto"):
    """Writes the figure of ``runs`` ([(label, rows)]) to ``out``; returns the matplotlib Figure."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"exps/plot_loss.py needs matplotlib ({e}); install the plots extra: "
                         f"pip install -e .[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(10, 7), height_ratios=[3, 1],
                                    constrained_layout=True)
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo, hi = float("inf"), 0.0
    for i, (label, rows) in enumerate(runs):
        style = STYLES[i % len(STYLES)]
        prefix = f"{label}: " if len(runs) > 1 else ""
        for t, s in series(rows, key, window).items():
            c = colours.setdefault(t, palette[len(colours) % len(palette)])
            if s["step"]:
                ax.plot(s["step"], s["value"], ".", color=c, alpha=0.45, markersize=5)
                ax.plot(s["step"], s["running"], style, color=c, linewidth=1.8, label=f"{prefix}{t}")
            if s["val_step"]:
                ax.plot(s["val_step"], s["val"], "s" + style, color=c, markersize=5, linewidth=1,
                        markerfacecolor="white", label=f"{prefix}{t} (validation)")
            vals = [v for v in s["value"] + s["val"] if v > 0]
            if vals:
                lo, hi = min(lo, min(vals)), max(hi, max(vals))
        lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
        if lr:
            ax_lr.plot([p[0] for p in lr], [p[1] for p in lr], style, color="0.25", label=label)
    if not colours:
        raise SystemExit(f"no logged {key!r} values to plot")
    if yscale == "log" or (yscale == "auto" and hi > 20 * lo):
        ax.set_yscale("log")
    ax.set_ylabel(f"{key} (dots: logged steps, line: running mean per type)")
    ax.set_title(f"{key} per data type" + (f" - {len(runs)} runs" if len(runs) > 1 else f" - {runs[0][0]}"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncol=2 if len(ax.get_lines()) > 12 else 1)
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(True, alpha=0.3)
    if len(runs) > 1:
        ax_lr.legend(fontsize=8, loc="upper right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, nargs="+", help="metrics.jsonl files written by finetune_solver.py")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one label per metrics file (default: the name of the file's folder)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--key", default="loss", help="which metric to plot (loss, closs, z_loss, grad_norm, ...)")
    p.add_argument("--window", type=int, default=10,
                   help="steps of the running mean when metrics.jsonl has no loss/{type} for --key")
    p.add_argument("--yscale", choices=["auto", "linear", "log"], default="auto",
                   help="y axis of the top panel (auto: log when the values span more than 20x)")
    args = p.parse_args(argv)
    labels = args.labels or [m.resolve().parent.name for m in args.metrics]
    if len(labels) != len(args.metrics):
        p.error(f"--labels: {len(labels)} labels for {len(args.metrics)} metrics files")
    if args.window < 1:
        p.error("--window must be >= 1")
    runs = [(label, read_rows(m)) for label, m in zip(labels, args.metrics)]
    plot(runs, args.out, key=args.key, window=args.window, yscale=args.yscale)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Training logs: ``common.log`` / ``rank-N.log`` handlers, ``metrics.jsonl`` (and the dashboards of
model/training/dashboards.py, fed the same rows), the running loss per batch type.

``metrics.jsonl`` (rank 0 appends one JSON object per logged step; a resumed run appends to the same file,
so a step may appear twice and the last line wins):

    step            optimizer steps done since the start of training (global, 1-based after the update)
    epoch, iter     epoch (0-based) and optimizer steps done within it
    lr              learning rate used by this update
    loss            closs + z_loss_weight * z_loss, over all labelled tokens of the global batch
    closs           cross-entropy per labelled token (global batch)
    z_loss          mean logsumexp^2 per labelled token (global batch), unweighted
    grad_norm       total gradient norm before clipping
    time            seconds of this step (data included); data_time: seconds waiting for data
    tokens_per_sec  non-padding tokens per second, per rank (global tokens / time / world size)
    tflops          model TFLOP/s per rank: (6 * non-embedding params + 12 * layers * hidden * seq_len)
                    per padded token, forward + backward, not counting activation recomputation
    memory          MB: peak memory during the step: on CUDA the peak allocated by torch; on CPU the peak
                    resident set size (VmHWM), reset at the start of each step through /proc/self/clear_refs.
                    Where that reset is not possible (not Linux, or Linux < 4.0), the value is the process's
                    peak since it started, and a warning at the first step says so
    tokens          labelled tokens in the global batch (the loss denominator)
    trainable_params  parameters that train (--trainable / --lora_rank; rows count for row-level presets)
    eta             seconds left to the end of the run (--epochs, or --max_steps if sooner): the median time of
                    the last 20 trained steps times the steps left (the median ignores the first step's
                    compilation with --compile, and evaluation or checkpoint pauses)
    type            the data-config ``type`` of the step's global batch (a global batch holds one type)
    loss/{type}     running loss of that type: the mean of ``loss`` over the last --type_loss_window
                    trained steps of this type (this step included; windowed, not exponential). In a mixed
                    run consecutive steps alternate between types whose losses differ a lot, so one curve
                    of ``loss`` zigzags; one curve per type does not. Only the row's own type is written.
    val_loss        (rows of steps with an evaluation, see model/training/evaluation.py) loss over the held-out
    val_loss/{type} records of --val_data_config, all types / per type; val_tokens: labelled tokens in it

A step is written when ``step % --log_every == 0`` or when it has an evaluation (one row per step: the
evaluation's keys join the step's row). Skipped steps (--skip_iterations) write no row.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LOG_FORMAT = "[rank{rank}:%(levelname)s|%(filename)s:%(lineno)s] %(asctime)s >> %(message)s"


def setup_logging(output_dir: str | Path, rank: int) -> list[logging.Handler]:
    """Console + ``common.log`` (INFO on rank 0, WARNING elsewhere) and ``rank-{rank}.log`` (INFO), as in
    Lumina. Returns the handlers (``teardown_logging`` removes them)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(LOG_FORMAT.format(rank=rank))
    level = logging.INFO if rank == 0 else logging.WARNING
    console = logging.StreamHandler(sys.stdout)
    common = logging.FileHandler(out / "common.log")
    own = logging.FileHandler(out / f"rank-{rank}.log")
    for h, lv in ((console, level), (common, level), (own, logging.INFO)):
        h.setLevel(lv)
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers = [console, common, own]
    for h in handlers:
        root.addHandler(h)
    for noisy in ("torch.distributed", "transformers", "fsspec", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handlers


def teardown_logging(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger()
    for h in handlers:
        root.removeHandler(h)
        h.close()


def flops_per_token(n_params_no_embed: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per token for forward + backward (the PaLM / Megatron convention)."""
    return 6.0 * n_params_no_embed + 12.0 * n_layers * hidden * seq_len


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB since the last ``reset_peak_memory(device)`` (see ``memory`` above)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the process's peak resident set (VmHWM); ru_maxrss can be inherited from a parent over exec
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


_cpu_peak_resettable: bool | None = None  # None: not tried yet


def reset_peak_memory(device: torch.device) -> bool:
    """Starts a new peak-memory window for ``peak_memory_mb``. On CPU, writing 5 to /proc/self/clear_refs
    sets the kernel's VmHWM to the current RSS (Linux >= 4.0, see proc(5)). Returns False where the peak
    cannot be reset: the value then stays the process-lifetime peak (warned once)."""
    global _cpu_peak_resettable
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if _cpu_peak_resettable is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _cpu_peak_resettable = True
    except OSError as e:
        _cpu_peak_resettable = False
        logger.warning("cannot reset the peak resident set per step (/proc/self/clear_refs: %s): the metric "
                       "'memory' is the process's peak since it started, not the step's", e.strerror or e)
    return _cpu_peak_resettable


class MetricsWriter:
    """Rank 0's sink for per-step metrics: metrics.jsonl, then each dashboard of ``sinks`` (objects with
    ``log(row)`` and ``close()``, see model/training/dashboards.py)."""

    def __init__(self, output_dir: str | Path, enabled: bool, sinks: list | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.sinks = list(sinks or []) if enabled else []

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log(row)

    def log_images(self, step: int, images: list) -> None:
        """``images``: (caption, PIL image) pairs, e.g. the trainer's samples; to each dashboard (none: no-op)."""
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.log_images(step, images)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TypeLoss:
    """Running loss per batch type: the mean of the last ``window`` losses of each type (``loss/{type}``).
    Its state goes into the checkpoint, so a resumed run reports the same running means."""

    def __init__(self, window: int):
        self.window = int(window)
        self.recent: dict[str, list[float]] = {}

    def update(self, type_name: str, loss: float) -> dict[str, float]:
        """Adds one step's loss; returns ``{"loss/{type}": running mean}`` for this type."""
        r = self.recent.setdefault(type_name, [])
        r.append(float(loss))
        del r[:-self.window]
        return {f"loss/{type_name}": sum(r) / len(r)}

    def state_dict(self) -> dict:
        return {"window": self.window, "recent": {t: list(v) for t, v in self.recent.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.recent = {str(t): [float(x) for x in v][-self.window:] for t, v in sd.get("recent", {}).items()}


class EtaClock:
    """Time left to ``end_step`` from the recent step times (the ``eta`` of metrics.jsonl)."""

    def __init__(self, end_step: int, window: int = 20):
        self.end_step = int(end_step)
        self.window = int(window)
        self.recent: list[float] = []

    def update(self, step: int, seconds: float) -> float:
        """Adds the time of trained step ``step`` (1-based); returns the seconds left after it."""
        self.recent.append(float(seconds))
        del self.recent[:-self.window]
        r = sorted(self.recent)
        return r[len(r) // 2] * max(self.end_step - step, 0)


def format_duration(seconds: float) -> str:
    """1d02h, 3h05m, 4m07s, 12s."""
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_console(row: dict, steps_total: int) -> str:
    eta = f"  ETA {format_duration(row['eta'])}" if "eta" in row else ""
    return (f"epoch {row['epoch']} iter {row['iter']} step {row['step']}/{steps_total}  loss {row['loss']:.4f}  "
            f"closs {row['closs']:.4f}  z_loss {row['z_loss']:.3f}  lr {row['lr']:.3e}  "
            f"grad_norm {row['grad_norm']:.3f}  {row['tokens_per_sec']:.0f} tok/s/rank  "
            f"{row['tflops']:.3f} TFLOP/s/rank  time {row['time']:.3f}s (data {row['data_time']:.3f}s)  "
            f"mem {row['memory']:.0f}MB{eta}")

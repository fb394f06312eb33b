"""Dashboards: TensorBoard (``--tensorboard``) and Weights & Biases (``--wandb``), fed from metrics.jsonl rows.

Both are optional dependencies (``pip install -e .[dashboards]``); asking for one that is not installed
stops the run before it starts, saying what to install. Nothing is written to a dashboard unless asked.
Every numeric value of every metrics.jsonl row (see model/training/metrics.py: loss, closs, lr, grad_norm, ...,
``loss/{type}``, ``val_loss``, ``val_loss/{type}``) goes to both, at x = the row's ``step``; strings
(the row's ``type``) do not.

Images: ``MetricsWriter.log_images(step, images)`` (model/training/metrics.py) hands pictures with their
captions (the trainer's samples, ``--sample_prompts``) to each dashboard: TensorBoard image summaries under
``samples/{i}`` (the caption in the tag's text summary ``samples/{i}/prompt``), W&B one ``samples`` entry
of ``wandb.Image``s captioned with their prompts. Training does not import generation: the samples
(model/generation/samples.py) call this through a callback the trainer passes in.

TensorBoard: event files in ``{output_dir}/tensorboard/`` (Lumina's place). A resumed run writes a new
event file in the same folder with ``purge_step`` = the first step it will log again, so TensorBoard drops
the points the interrupted run had logged past the checkpoint instead of showing two curves.

W&B: ``--wandb_project``, ``--wandb_run_name``, ``--wandb_mode online|offline`` (default: ``WANDB_MODE``
from the environment, else online; offline needs no network, upload later with ``wandb sync``). Files go
to ``{output_dir}/wandb/`` unless ``WANDB_DIR`` is set. The run id is kept in ``{output_dir}/wandb_run_id``;
a run that resumes from a checkpoint continues that W&B run (``resume="allow"``), a fresh start in the
same folder begins a new one. W&B ignores a step at or below the last one it holds: after a resume from a
checkpoint older than the last logged step, the replayed steps keep their first values, which are the same
(resume is bitwise). The console is not captured (``console="off"``): the logs are in common.log.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[dashboards]"


class DashboardError(RuntimeError):
    """A dashboard was asked for and cannot be used (package missing, cannot start); says what to do."""


def missing_packages(tensorboard: bool, wandb: bool) -> list[str]:
    """Problems, naming the flag and what to install, for dashboards asked for but not installed."""
    bad = []
    for flag, wanted, module in (("--tensorboard", tensorboard, "tensorboard"), ("--wandb", wandb, "wandb")):
        if not wanted:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            bad.append(f"{flag} needs the {module} package, which is not installed ({e}); install the "
                       f"dashboards extra: {INSTALL_HINT}")
    return bad


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, output_dir: Path, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(output_dir) / "tensorboard"
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge, flush_secs=30)
        logger.info("TensorBoard event files in %s (tensorboard --logdir %s)", self.log_dir, self.log_dir)

    def log(self, row: dict) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, int(row["step"]))

    def log_images(self, step: int, images: list[tuple[str, "Image.Image"]]) -> None:
        import numpy as np

        for i, (caption, img) in enumerate(images):
            self.writer.add_image(f"samples/{i}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self.writer.add_text(f"samples/{i}/prompt", caption, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    ID_FILE = "wandb_run_id"

    def __init__(self, output_dir: Path, *, project: str, run_name: str | None, mode: str | None, config: dict,
                 resuming: bool):
        import wandb

        out = Path(output_dir)
        id_file = out / self.ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        kw = {} if os.environ.get("WANDB_DIR") else {"dir": str(out)}
        try:
            self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", mode=mode,
                                  config=config, settings=wandb.Settings(console="off"), **kw)
        except Exception as e:  # noqa: BLE001 - wandb raises its own error types (CommError, UsageError, ...)
            raise DashboardError(f"--wandb: cannot start the W&B run {run_id} of project {project!r} "
                                 f"({type(e).__name__}: {e}); without a network use --wandb_mode offline") from e
        logger.info("W&B run %s (project %s, %s mode%s), files in %s", run_id, project,
                    mode or os.environ.get("WANDB_MODE", "online"), ", continued" if resuming else "",
                    self.run.dir)

    def log(self, row: dict) -> None:
        self.run.log(_scalars(row), step=int(row["step"]))

    def log_images(self, step: int, images: list[tuple[str, "Image.Image"]]) -> None:
        import wandb

        # the same step as that step's scalars (logged just before): W&B adds them to the same history row
        self.run.log({"samples": [wandb.Image(img, caption=caption) for caption, img in images]}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_dashboards(output_dir: str | Path, *, enabled: bool, tensorboard: bool, wandb: bool,
                    wandb_project: str, wandb_run_name: str | None, wandb_mode: str | None, config: dict,
                    resumed_step: int | None) -> list:
    """The dashboards asked for (rank 0 only: ``enabled``); ``resumed_step`` is the step of the checkpoint
    resumed from (None for a fresh start). DashboardError if one cannot be used."""
    if not enabled:
        return []
    problems = missing_packages(tensorboard, wandb)
    if problems:
        raise DashboardError("; ".join(problems))
    sinks: list = []
    if tensorboard:
        sinks.append(TensorBoardSink(Path(output_dir), resumed_step))
    if wandb:
        sinks.append(WandbSink(Path(output_dir), project=wandb_project, run_name=wandb_run_name, mode=wandb_mode,
                               config=config, resuming=resumed_step is not None))
    return sinks

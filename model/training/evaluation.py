"""Validation loss during training: when to evaluate, and the loss of held-out batches over all ranks.

``Evaluator(batches, type_names, every=N, z_loss_weight=w, device=d)``; in the loop
``if evaluator.due(step, epoch_end): row.update(evaluator.run(lm))``. ``batches`` is re-iterable and yields
this rank's ``(type index, batch dict)`` (input_ids / labels as data/collate.py makes them) or ``None``
where this rank has no batch left but the others do (FSDP needs every rank in every forward: a forward of
two unlabelled tokens stands in). data/eval_data.py builds it from ``--val_data_config``; this module does
not read training data.

When: every ``--eval_every`` optimizer steps (0: never by count) and after the last step of each epoch,
before that step's checkpoint is written, so a resumed run neither repeats nor misses an evaluation.

What: the loss of ``metrics.jsonl``'s ``loss`` (cross-entropy + ``--z_loss_weight`` * z-loss, image logits
masked as in training), as the mean over all labelled tokens of the held-out items, in eval mode (no
dropout) and without gradients. Each rank evaluates its share; one all-reduce sums (cross-entropy, z,
tokens) per type. Returned: ``val_loss``, ``val_loss/{type}`` per type and ``val_tokens``.

The training run is not disturbed: the torch RNG (CPU and CUDA) is restored afterwards, the training
sampler is never touched, and FSDP modules are re-sharded, so losses and resume stay bitwise what they are
without evaluation (tests/test_evaluation.py).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
from torch.distributed.fsdp import FSDPModule

from model.chameleon_lm import IGNORE_INDEX
from model.training.distributed import all_reduce_sum

logger = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, batches: Iterable, type_names: list[str], *, every: int, z_loss_weight: float,
                 device: torch.device):
        self.batches = batches
        self.type_names = list(type_names)
        self.every = int(every)
        self.z_loss_weight = float(z_loss_weight)
        self.device = device

    def due(self, step: int, epoch_end: bool) -> bool:
        return epoch_end or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def run(self, lm: torch.nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        n_types = len(self.type_names)
        ce = [0.0] * n_types
        z = [0.0] * n_types
        tok = [0] * n_types
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = lm.training
        lm.eval()
        try:
            with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
                for item in self.batches:
                    if item is None:
                        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
                        lm(ids, torch.full_like(ids, IGNORE_INDEX))
                        continue
                    t, b = item
                    out = lm(b["input_ids"].to(self.device), b["labels"].to(self.device))
                    ce[t] += float(out.ce_sum)
                    z[t] += float(out.z_sum)
                    tok[t] += int(out.n_tokens)
        finally:
            for m in lm.modules():  # sdp keeps gathered parameters after a forward; training expects shards
                if isinstance(m, FSDPModule):
                    m.reshard()
            lm.train(was_training)
        sums = all_reduce_sum(ce + z + tok, self.device)
        ce, z, tok = sums[:n_types], sums[n_types:2 * n_types], sums[2 * n_types:]
        row: dict[str, float] = {}
        for i, name in enumerate(self.type_names):
            if tok[i] > 0:
                row[f"val_loss/{name}"] = (ce[i] + self.z_loss_weight * z[i]) / tok[i]
        n = sum(tok)
        row = {"val_loss": (sum(ce) + self.z_loss_weight * sum(z)) / n if n else float("nan"),
               **row, "val_tokens": int(n)}
        logger.info("validation: loss %.4f over %d labelled tokens (%s) in %.2fs", row["val_loss"], n,
                    ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in row.items() if k.startswith("val_loss/")),
                    time.perf_counter() - t0)
        return row

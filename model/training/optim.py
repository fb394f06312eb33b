"""AdamW and Lumina's learning-rate schedule.

Schedule (Lumina's ``adjust_learning_rate_epoch``, xllmx/util/lr_sched.py): at a fractional epoch ``e`` the
learning rate is ``lr * e / warmup_epochs`` during warmup, then a half-cycle cosine from ``lr`` down to
``min_lr`` at ``epochs``. Lumina evaluates it at the last micro-batch of each accumulation window
(``data_iter_step / len(dataloader) + epoch``, on the accumulation boundary), so the update of optimizer
step ``s`` (0-based) runs at ``e = (s * accum_iter + accum_iter - 1) / (steps_per_epoch * accum_iter)``: with
``accum_iter`` 1 the very first update runs at learning rate 0. The schedule is a pure function of the step,
so resuming needs no scheduler state.

Weight decay: Lumina decays every parameter; we leave norm weights and biases undecayed (the usual
practice, asked for in our issue); ``--decay_norm_and_bias`` restores Lumina's behaviour.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETAS = (0.9, 0.95)


def lr_at(step: int, steps_per_epoch: int, *, lr: float, min_lr: float, warmup_epochs: float, epochs: int,
          accum_iter: int = 1) -> float:
    """Learning rate of optimizer step ``step`` (0-based, counted over all epochs)."""
    # Lumina's fractional epoch at the micro-batch that ends this step's accumulation window
    epoch_f = (step * accum_iter + accum_iter - 1) / (steps_per_epoch * accum_iter)
    if epoch_f < warmup_epochs:
        return lr * epoch_f / warmup_epochs
    span = epochs - warmup_epochs
    progress = min(max((epoch_f - warmup_epochs) / span, 0.0), 1.0) if span > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights (RMSNorm, the per-head q/k LayerNorms) and biases."""
    return name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2] or param.dim() < 2


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, decay_norm_and_bias: bool = False
                    ) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if (not decay_norm_and_bias and no_decay(name, p)) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    # foreach=True works with the sharded DTensor parameters of FSDP2 and is deterministic on CPU
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=weight_decay, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

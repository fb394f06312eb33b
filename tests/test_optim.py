"""The optimizer and the learning-rate schedule against Lumina-mGPT's own code.

Lumina (xllmx/util/lr_sched.py, ``adjust_learning_rate_epoch``)::

    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))

called by xllmx/solvers/finetune/finetune.py on each accumulation boundary with
``epoch = data_iter_step / len(dataloader_train) + epoch`` (``data_iter_step`` counts micro-batches, so the
boundary of optimizer step s is micro-batch ``s * accum_iter + accum_iter - 1``), and
``torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.95))``: one group,
decay on everything. The expected values below are that formula worked out by hand at the points named.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ChameleonConfig

from model.chameleon_lm import build_chameleon_lm
from model.training.optim import build_optimizer, lr_at


def lumina_lr(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Lumina's adjust_learning_rate_epoch, as quoted in the module docstring."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


# (step, steps_per_epoch, accum_iter, lr, min_lr, warmup_epochs, epochs, expected), expected by hand
KNOWN_POINTS = [
    # warmup, accum 1: the first update runs at lr 0 (Lumina sets it at micro-batch 0)
    (0, 10, 1, 1e-3, 1e-4, 0.5, 2, 0.0),
    # warmup: epoch 0.2 of 0.5 -> 0.4 * lr
    (2, 10, 1, 1e-3, 1e-4, 0.5, 2, 4e-4),
    # warmup ends exactly at epoch 0.5: the cosine's start, lr itself
    (5, 10, 1, 1e-3, 1e-4, 0.5, 2, 1e-3),
    # mid-cosine: epoch 1.25 is half-way through [0.5, 2]: min_lr + (lr - min_lr) / 2
    (125, 100, 1, 1e-3, 1e-4, 0.5, 2, 5.5e-4),
    # a quarter of the cosine: epoch 0.875 -> min + 0.9e-3 * (1 + cos(pi/4)) / 2
    (875, 1000, 1, 1e-3, 1e-4, 0.5, 2, 1e-4 + 0.9e-3 * 0.5 * (1 + math.sqrt(0.5))),
    # the end of the schedule: the step after the last one is exactly min_lr
    (200, 100, 1, 1e-3, 1e-4, 0.5, 2, 1e-4),
    # the last step: epoch 1.99, progress 1.49/1.5
    (199, 100, 1, 1e-3, 1e-4, 0.5, 2, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 1.49 / 1.5))),
    # Lumina's default fractional warmup 0.03 epochs: step 15 of 1000 is half-way -> lr / 2
    (15, 1000, 1, 2e-5, 0.0, 0.03, 1, 1e-5),
    (30, 1000, 1, 2e-5, 0.0, 0.03, 1, 2e-5 * 0.5 * (1 + math.cos(math.pi * 0.0 / 0.97))),
    # accum_iter 4, 10 steps (40 micro-batches) per epoch: step 0's boundary is micro-batch 3 -> epoch 0.075
    (0, 10, 4, 1e-3, 0.0, 0.5, 1, 1e-3 * 0.075 / 0.5),
    # step 2 -> micro-batch 11 -> epoch 0.275
    (2, 10, 4, 1e-3, 0.0, 0.5, 1, 1e-3 * 0.275 / 0.5),
    # second epoch, accum 2, 8 steps per epoch: step 11 -> epoch 1 + 7/16; warmup 0.1, 2 epochs
    (11, 8, 2, 1e-2, 1e-3, 0.1, 2, 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * (1 + 7 / 16 - 0.1) / 1.9))),
]


@pytest.mark.parametrize("step,spe,accum,lr,min_lr,warmup,epochs,expected", KNOWN_POINTS)
def test_lr_at_matches_lumina_adjust_learning_rate_epoch_at_known_points(step, spe, accum, lr, min_lr, warmup,
                                                                          epochs, expected):
    got = lr_at(step, spe, lr=lr, min_lr=min_lr, warmup_epochs=warmup, epochs=epochs, accum_iter=accum)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # and the same as Lumina's formula fed Lumina's fractional epoch at that step's accumulation boundary
    micro = step * accum + accum - 1
    epoch_f = micro // (spe * accum) + (micro % (spe * accum)) / (spe * accum)
    assert got == pytest.approx(lumina_lr(epoch_f, lr=lr, min_lr=min_lr, warmup_epochs=warmup, epochs=epochs),
                                rel=1e-12, abs=1e-15)


def test_lr_at_follows_lumina_over_a_whole_run_with_accumulation():
    spe, accum, epochs = 7, 3, 3
    for step in range(spe * epochs):
        epoch, k = divmod(step, spe)
        epoch_f = (k * accum + accum - 1) / (spe * accum) + epoch  # finetune.py's data_iter_step / len + epoch
        assert lr_at(step, spe, lr=3e-4, min_lr=1e-5, warmup_epochs=0.4, epochs=epochs, accum_iter=accum) == \
            pytest.approx(lumina_lr(epoch_f, lr=3e-4, min_lr=1e-5, warmup_epochs=0.4, epochs=epochs), rel=1e-12)


def test_lr_at_without_warmup_starts_at_the_peak_and_never_divides_by_zero():
    assert lr_at(0, 10, lr=1e-3, min_lr=0.0, warmup_epochs=0.0, epochs=1) == pytest.approx(1e-3)
    # warmup as long as the run: Lumina would divide by zero at the end; we stay at the warmup's last value
    assert lr_at(9, 10, lr=1e-3, min_lr=0.0, warmup_epochs=1.0, epochs=1) == pytest.approx(0.9e-3)


@pytest.fixture(scope="module")
def lm():
    config = ChameleonConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64,
                             vocabulary_map={"<image>": 10, "IMGIMGAAZ": 20},
                             vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1],
                                            num_res_blocks=1, latent_channels=8, attn_resolutions=[]))
    return build_chameleon_lm(config)


def _groups(opt: torch.optim.Optimizer, lm) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in lm.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in opt.param_groups]


NO_DECAY = {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_norm.bias",
            "model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.k_norm.bias",
            "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight"}


def test_adamw_uses_lumina_betas_in_every_group(lm):
    opt = build_optimizer(lm, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95)] * len(opt.param_groups)
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_norm_weights_and_biases_are_not_decayed_by_default(lm):
    groups = _groups(build_optimizer(lm, lr=1e-3, weight_decay=0.1), lm)
    everything = {n for n, _ in lm.named_parameters()}
    # the per-head q/k LayerNorm affines are 2-D ([heads, head_dim]): found by name, not by shape
    assert groups == [(0.1, everything - NO_DECAY), (0.0, NO_DECAY)]


def test_decay_norm_and_bias_decays_everything_as_lumina_does(lm):
    groups = _groups(build_optimizer(lm, lr=1e-3, weight_decay=0.1, decay_norm_and_bias=True), lm)
    assert groups == [(0.1, {n for n, _ in lm.named_parameters()})]


def test_frozen_parameters_are_left_out_of_the_optimizer(lm):
    lm.model.embed_tokens.weight.requires_grad_(False)
    try:
        groups = _groups(build_optimizer(lm, lr=1e-3, weight_decay=0.1), lm)
    finally:
        lm.model.embed_tokens.weight.requires_grad_(True)
    assert all("model.embed_tokens.weight" not in names for _, names in groups)


def test_one_adamw_step_decays_only_the_decayed_group(lm):
    """The groups' settings reach the update: with a zero gradient, AdamW moves a parameter only by its
    decoupled weight decay, p -= lr * wd * p."""
    opt = build_optimizer(lm, lr=0.5, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    for p in lm.parameters():
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
        for n, p in lm.named_parameters():
            factor = 1.0 if n in NO_DECAY else 1 - 0.5 * 0.1
            torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)
    finally:
        with torch.no_grad():
            for n, p in lm.named_parameters():
                p.copy_(before[n])
                p.grad = None

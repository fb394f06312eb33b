"""Lumina-mGPT's q/k norms: one LayerNorm affine per group of heads, trained as Lumina trains it.

Chameleon normalises each head's query and key with a LayerNorm whose statistics are over head_dim only.
Its affine (weight, bias) was trained with one copy per model-parallel shard: Lumina-mGPT's attention
holds ``q_norm.weight`` / ``bias`` as ``[model_parallel_size, head_dim]`` and applies row g to the heads of
shard g by ``repeat_interleave(heads // model_parallel_size)``. transformers' ``ChameleonLayerNorm`` holds
one affine per head (``[num_heads, head_dim]``; Meta's conversion repeats the shard rows). Training the
per-head copies independently makes them drift apart after the first step: more free parameters than
the model being fine-tuned, and a result that no longer folds back into Lumina's layout.

This module owns that parameterisation:

- ``GroupedQKNorm``: the replacement for transformers' q_norm / k_norm (same attribute names, so the
  state-dict keys stay ``model.layers.N.self_attn.q_norm.weight`` ...), parameters ``[groups, head_dim]``;
- the grouping of a run, ``config.qk_norm_groups`` (``QK_NORM_GROUPS``): an int G (both q and k norms are
  ``[G, head_dim]``), or None for independent per-head norms (transformers' own modules, untouched);
  ``qk_norm_shapes(config)`` tells the parameter shapes it implies;
- ``decide_groups``: the grouping a checkpoint came with, from its stored norm tensors;
- ``fit_qk_norm``: any stored layout (per shard, per head) to the shapes a config asks for, exactly or
  not at all (``QKNormLayoutError``), used by the loaders and both exports.

Pure torch: no file reading here (model/chameleon_lm.py and model/lumina_layout.py do that).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

QK_NORM_GROUPS = "qk_norm_groups"  # the config attribute (and config.json key) recording the grouping
EPS = 1e-5  # transformers' and Lumina's ChameleonLayerNorm hard-code it in forward
NORM_KEY_RE = re.compile(r"^(?P<prefix>.*\.self_attn\.)(?P<norm>q_norm|k_norm)\.(?P<param>weight|bias)$")


class QKNormLayoutError(ValueError):
    """Stored q/k norm tensors that cannot be put into the asked layout without changing the model."""


def head_counts(config) -> dict[str, int]:
    """Heads each norm is applied to: q_norm over the attention heads, k_norm over the key/value heads."""
    h = int(config.num_attention_heads)
    return {"q_norm": h, "k_norm": int(config.num_key_value_heads or h)}


def head_dim(config) -> int:
    return int(config.hidden_size) // int(config.num_attention_heads)


def qk_norm_groups(config) -> int | None:
    """The run's grouping recorded in ``config`` (None: one independent affine per head)."""
    g = getattr(config, QK_NORM_GROUPS, None)
    return None if g is None else int(g)


def qk_norm_shapes(config) -> dict[str, tuple[int, int]]:
    """Shapes of the q_norm / k_norm weight and bias a model built from ``config`` holds:
    ``{"q_norm": (rows, head_dim), "k_norm": (rows, head_dim)}``."""
    g = qk_norm_groups(config)
    d = head_dim(config)
    return {name: (g if g is not None else n, d) for name, n in head_counts(config).items()}


def check_groups(groups: int, config) -> None:
    for name, n in head_counts(config).items():
        if groups < 1 or n % groups:
            raise QKNormLayoutError(f"{QK_NORM_GROUPS}={groups} does not divide the {n} heads of {name}")


# ----------------------------------------------------------------------------------------------------------
# the module


class GroupedQKNorm(nn.Module):
    """LayerNorm over head_dim (no affine), then the affine of each head's group:

        y[..., h, :] = layer_norm(x[..., h, :]) * weight[h // (heads / groups)] + bias[h // (heads / groups)]

    written as Lumina writes it (``repeat_interleave`` of the [groups, head_dim] parameters over the heads),
    so a per-head model whose heads are equal within groups gives bitwise the same outputs."""

    def __init__(self, groups: int, head_dim: int, heads: int, *, device=None, dtype=None):
        super().__init__()
        if heads % groups:
            raise QKNormLayoutError(f"{groups} q/k-norm groups do not divide {heads} heads")
        self.groups, self.heads, self.head_dim = groups, heads, head_dim
        self.weight = nn.Parameter(torch.ones(groups, head_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim, device=device, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        per = self.heads // self.groups
        x = F.layer_norm(hidden_states, (self.head_dim,), None, None, eps=EPS)
        return x * self.weight.repeat_interleave(per, dim=0) + self.bias.repeat_interleave(per, dim=0)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, heads={self.heads}, head_dim={self.head_dim}, eps={EPS}"


def install_grouped_qk_norms(decoder: nn.Module, config) -> None:
    """Replaces every layer's ``self_attn.q_norm`` / ``k_norm`` by a ``GroupedQKNorm`` when ``config`` records
    a grouping (nothing to do for None). Values already held (a loaded model) are carried over exactly."""
    g = qk_norm_groups(config)
    if g is None:
        return
    check_groups(g, config)
    heads, d = head_counts(config), head_dim(config)
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        for name, n in heads.items():
            old = getattr(attn, name)
            new = GroupedQKNorm(g, d, n, device=old.weight.device, dtype=old.weight.dtype)
            if old.weight.device.type != "meta":
                with torch.no_grad():
                    for p in ("weight", "bias"):
                        getattr(new, p).copy_(_regroup(getattr(old, p).detach(), n, g,
                                                       f"model.layers.{i}.self_attn.{name}.{p}"))
            setattr(attn, name, new)


# ----------------------------------------------------------------------------------------------------------
# converting stored tensors


def _regroup(t: torch.Tensor, heads: int, rows: int, key: str) -> torch.Tensor:
    """``t`` ([stored_rows, head_dim], one affine per stored_rows-th of the heads) as ``[rows, head_dim]``;
    QKNormLayoutError unless that is exact (every head keeps its affine bit for bit)."""
    if t.dim() != 2 or heads % t.shape[0] or heads % rows:
        raise QKNormLayoutError(f"{key}: shape {tuple(t.shape)} is not [groups, head_dim] with groups dividing "
                                f"the {heads} heads (asked for {rows} rows)")
    if t.shape[0] == rows:
        return t
    per_head = t.repeat_interleave(heads // t.shape[0], dim=0)
    blocks = per_head.view(rows, heads // rows, t.shape[1])
    first = blocks[:, :1]
    if not torch.equal(blocks, first.expand_as(blocks)):
        raise QKNormLayoutError(f"{key}: the heads within each of {rows} groups differ, so it cannot be stored "
                                f"as [{rows}, {t.shape[1]}] without changing the model")
    return first.squeeze(1).contiguous()


def fit_qk_norm(key: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """A stored tensor in the shape a model built from ``config`` holds: q/k norm weights and biases are
    regrouped (per shard -> per head by repeat_interleave; per head -> per group when exact), every other
    key is returned as is."""
    m = NORM_KEY_RE.match(key)
    if m is None:
        return tensor
    rows = qk_norm_shapes(config)[m["norm"]][0]
    return _regroup(tensor, head_counts(config)[m["norm"]], rows, key)


def regroup_state_dict(sd: dict[str, torch.Tensor], config, rows: int | None) -> dict[str, torch.Tensor]:
    """``sd`` with every q/k norm tensor as ``[rows, head_dim]`` (None: per head, transformers' layout)."""
    heads = head_counts(config)
    out = {}
    for k, v in sd.items():
        m = NORM_KEY_RE.match(k)
        out[k] = v if m is None else _regroup(v, heads[m["norm"]], rows or heads[m["norm"]], k)
    return out


# ----------------------------------------------------------------------------------------------------------
# the grouping a checkpoint came with


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def decide_groups(norms: dict[str, torch.Tensor], config) -> tuple[int | None, str]:
    """(groups, why) for a checkpoint whose q/k norm tensors are ``norms`` (key -> tensor, all layers).

    - stored as ``[R, head_dim]`` for both q and k with R dividing both head counts and R not simply one
      row per head (Lumina's layout, R = its ``model_parallel_size``): G = R;
    - stored per head (transformers' layout): the grouping ``config`` records (our own exports) if it
      reproduces the tensors exactly, else the smallest grouping that does (Meta's conversion repeats
      each shard's affine over its heads), else None: the heads differ, they stay independent.
    """
    if not norms:
        raise QKNormLayoutError("the checkpoint has no self_attn.q_norm / k_norm tensors (not a Chameleon model)")
    heads = head_counts(config)
    rows: dict[str, set[int]] = {"q_norm": set(), "k_norm": set()}
    for k, v in norms.items():
        m = NORM_KEY_RE.match(k)
        if m is None or v.dim() != 2:
            raise QKNormLayoutError(f"{k}: shape {tuple(v.shape)}, expected [groups, head_dim]")
        rows[m["norm"]].add(int(v.shape[0]))
    if len(rows["q_norm"]) != 1 or len(rows["k_norm"]) != 1:
        raise QKNormLayoutError(f"q/k norm tensors with differing row counts across layers: {rows}")
    rq, rk = rows["q_norm"].pop(), rows["k_norm"].pop()
    per_head_stored = (rq, rk) == (heads["q_norm"], heads["k_norm"])
    mp = int(getattr(config, "model_parallel_size", 1) or 1)
    if rq == rk and heads["q_norm"] % rq == 0 and heads["k_norm"] % rq == 0 and (not per_head_stored or rq == mp):
        return rq, f"Lumina layout: one affine per model-parallel shard, model_parallel_size {mp}"
    if not per_head_stored:
        raise QKNormLayoutError(f"q/k norms stored with {rq} / {rk} rows fit neither Lumina's layout "
                                f"([model_parallel_size, head_dim] for both) nor per-head ({heads['q_norm']} / "
                                f"{heads['k_norm']} heads)")

    def reproduces(g: int) -> bool:
        try:
            for k, v in norms.items():
                _regroup(v, heads[NORM_KEY_RE.match(k)["norm"]], g, k)
        except QKNormLayoutError:
            return False
        return True

    recorded = qk_norm_groups(config)
    if recorded is not None and recorded < heads["q_norm"] and heads["k_norm"] % recorded == 0 \
            and heads["q_norm"] % recorded == 0 and reproduces(recorded):
        return recorded, f"per-head tensors, equal within the {recorded} groups the checkpoint records"
    for g in _divisors(math.gcd(heads["q_norm"], heads["k_norm"])):
        if g < heads["q_norm"] and reproduces(g):
            return g, "per-head tensors equal within each group, as Meta's conversion repeats each shard's affine"
    return None, "per-head tensors that differ between heads"

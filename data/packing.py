"""Sequence packing: several items share one row, attention stays within each item, positions restart.

``pack_rows(lengths, max_seq_len)`` places items into rows first-fit in the order given (the sampler's
order; deterministic): each item, truncated to ``max_seq_len``, goes into the first row with room for
it, else opens a new row. ``data.collate.collate(..., packing=True)`` uses it and emits ``doc_ids``
(1, 2, ... per item within a row, 0 on padding) and ``position_ids`` restarting at 0 for each item.

``block_causal_mask(doc_ids) -> bool[B, 1, L, L]``: ``mask[b, 0, q, k]`` is True (= may attend) when
``k <= q`` and tokens q and k belong to the same item. A padding query attends to itself only: a fully
masked query row would give NaN in SDPA's softmax, and NaN values of padding positions would then
reach real tokens through ``0 * NaN`` in the next layer's attention-weighted sum.

How transformers 5.23's Chameleon takes it (read from models/chameleon/modeling_chameleon.py and
masking_utils.py, and checked by tests/test_collate_packing.py on a tiny ChameleonForConditionalGeneration):

* ``ChameleonModel.forward`` calls ``masking_utils.create_causal_mask``, whose
  ``_preprocess_mask_arguments`` returns any 4-D ``attention_mask`` unchanged ("already prepared"): no
  causal or padding mask is added to it, so the mask must itself be causal, as this one is.
* ``attn_implementation="sdpa"`` (the default): the bool mask goes to
  ``torch.nn.functional.scaled_dot_product_attention(attn_mask=...)``, where True means attend; pass
  ``model(input_ids, attention_mask=block_causal_mask(doc_ids), position_ids=position_ids, use_cache=False)``.
* ``attn_implementation="eager"``: the mask is ADDED to the attention scores, so a bool mask would add
  0/1 and mask nothing. Pass ``to_additive_mask(mask, dtype)`` (0 where allowed, dtype-min elsewhere).
* ``flash_attention_2`` / flex: do not take a dense 4-D mask. Alternative that works for sdpa and eager
  too: pass ``attention_mask=None`` with the packed ``position_ids``; transformers then detects the
  packing itself (``find_packed_sequence_indices``: a new item starts wherever the position does not
  grow by 1) and builds the same block-causal mask. Our padding positions are all 0, so each padding
  token is its own one-token "item" there as well.
* Always pass ``position_ids`` (rotary embeddings restart per item) and ``use_cache=False`` in training.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pack_rows(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """First-fit packing in the given order. Returns, per row, the positions (into ``lengths``) of its
    items; an item longer than ``max_seq_len`` is counted as ``max_seq_len`` (it will be truncated)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        n = min(int(n), max_seq_len)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_seq_len - n)
    return rows


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool[B, 1, L, L] from ``doc_ids[B, L]`` (item number per token, 0 = padding); True = may attend."""
    if doc_ids.ndim != 2:
        raise ValueError(f"doc_ids must be [batch, seq_len], got shape {tuple(doc_ids.shape)}")
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril_()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    real = (doc_ids > 0)[:, :, None]
    eye = torch.eye(L, dtype=torch.bool, device=doc_ids.device)
    return ((same & real & causal) | eye).unsqueeze(1)


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as an additive float mask for ``attn_implementation="eager"``."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)

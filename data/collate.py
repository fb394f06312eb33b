"""Turns a micro-batch of items into padded (or packed) tensors, and measures the padding.

``collate(items, max_seq_len, pad_id, packing=False, pad_to_max_len=False)`` returns LongTensors:

    input_ids      [B, W]  token ids, ``pad_id`` on padding
    labels         [B, W]  aligned with input_ids (the loss shifts: logits[:, t] predicts labels[:, t+1]);
                           -100 on padding and on the first token of every item, so a shifted loss never
                           trains one packed item to predict the next one's first token (in an unpacked
                           row that label is never used by a shifted loss anyway)
    attention_mask [B, W]  1 on real tokens, 0 on padding (the 2-D mask for unpacked batches)
    position_ids   [B, W]  0, 1, ... per item (restarting for each packed item), 0 on padding
    doc_ids        [B, W]  1, 2, ... item number within its row, 0 on padding; give it to
                           ``data.packing.block_causal_mask`` for the 4-D mask of packed batches
    n_real_tokens  []      real (non-padding) tokens in the batch, for logging the padding waste
    n_items        []      items in the batch

Every item is truncated to ``max_seq_len``. Unpacked: one item per row (B = number of items). Packed:
items are placed first-fit in the sampler's order (``data.packing.pack_rows``), B = rows used (at most
the number of items). W is the longest row, or ``max_seq_len`` with ``pad_to_max_len=True`` (fixed
shapes, e.g. for torch.compile); padding to the longest row is what makes length clustering pay off.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data.packing import pack_rows
from data.records import IGNORE_INDEX


def collate(items: Sequence[dict], max_seq_len: int, pad_id: int, packing: bool = False,
            pad_to_max_len: bool = False) -> dict[str, torch.Tensor]:
    if not items:
        raise ValueError("collate needs at least one item")
    toks = [np.asarray(it["input_ids"], dtype=np.int64)[:max_seq_len] for it in items]
    labs = [np.asarray(it["labels"], dtype=np.int64)[:max_seq_len] for it in items]
    for i, (t, lab) in enumerate(zip(toks, labs)):
        if t.shape != lab.shape:
            raise ValueError(f"item {i} of the micro-batch has {t.shape[0]} tokens but {lab.shape[0]} labels")
    lens = [t.shape[0] for t in toks]
    rows = pack_rows(lens, max_seq_len) if packing else [[i] for i in range(len(items))]
    fill = [sum(lens[i] for i in r) for r in rows]
    W = max_seq_len if pad_to_max_len else max(fill)
    B = len(rows)
    input_ids = np.full((B, W), pad_id, dtype=np.int64)
    labels = np.full((B, W), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, W), dtype=np.int64)
    doc_ids = np.zeros((B, W), dtype=np.int64)
    for b, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row, 1):
            n = lens[i]
            input_ids[b, pos:pos + n] = toks[i]
            labels[b, pos:pos + n] = labs[i]
            labels[b, pos] = IGNORE_INDEX
            position_ids[b, pos:pos + n] = np.arange(n)
            doc_ids[b, pos:pos + n] = d
            pos += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy((doc_ids > 0).astype(np.int64)),
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
        "n_real_tokens": torch.tensor(sum(lens), dtype=torch.int64),
        "n_items": torch.tensor(len(items), dtype=torch.int64),
    }


def padding_waste(batch: dict[str, torch.Tensor]) -> float:
    """Fraction of the batch's token slots that are padding (0.0 = none)."""
    return 1.0 - int(batch["n_real_tokens"]) / batch["input_ids"].numel()


def padding_waste_of_lengths(micro_batches: Sequence[Sequence[int]], max_seq_len: int, packing: bool = False,
                             pad_to_max_len: bool = False) -> float:
    """The padding waste ``collate`` would produce over these micro-batches (given as item lengths),
    computed from lengths alone (for benchmarks over millions of items)."""
    real = slots = 0
    for lens in micro_batches:
        lens = [min(int(n), max_seq_len) for n in lens]
        rows = pack_rows(lens, max_seq_len) if packing else [[i] for i in range(len(lens))]
        fill = [sum(lens[i] for i in r) for r in rows]
        real += sum(lens)
        slots += len(rows) * (max_seq_len if pad_to_max_len else max(fill))
    return 1.0 - real / slots if slots else 0.0

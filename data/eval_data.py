"""Held-out data for the validation loss: which records, in which batches, on which rank.

    val = EvalData.build("val.yaml", max_seq_len=4096, batch_size=4, eval_items=None, seed=0, pad_id=1,
                         world_size=world, rank=rank)
    evaluator = Evaluator(val, val.type_names, ...)   # model/training/evaluation.py iterates it at each evaluation

``--val_data_config`` is a data config YAML in the training format (data/data_config.py); every record of
it is held out once (``ratio`` is ignored: validation does not sample). ``--eval_items K`` takes K of them
instead, chosen once from ``numpy.random.default_rng([seed, 7])`` and the same at every evaluation and after
a resume; no other random numbers are drawn and the training sampler is not touched.

Batches: the chosen items are grouped by ``type``, sorted by length within a type (less padding) and cut
into batches of ``batch_size`` items, so each batch has one type and the per-type loss needs no per-item
bookkeeping. Batch ``j`` goes to rank ``j % world_size``. FSDP needs every rank to run the same number of
forwards, so a rank with fewer batches yields ``None`` for the missing ones (the evaluator runs a forward
without labels there). Items are read in the calling process (no DataLoader, hence no worker seeds taken
from the global RNG).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterator

import numpy as np
import torch

from data.collate import collate
from data.data_config import load_data_config
from data.dataset import RecordDataset

logger = logging.getLogger(__name__)


class EvalData:
    """This rank's validation batches; iterating yields ``(type index, batch dict)`` or ``None``."""

    def __init__(self, dataset: RecordDataset, items: np.ndarray, *, batch_size: int, pad_id: int,
                 world_size: int, rank: int):
        self.dataset = dataset
        self.type_names = list(dataset.type_names)
        self.pad_id = pad_id
        starts = np.array([s for s, _ in dataset.source_ranges])
        item_type = np.asarray(dataset.source_type)[np.searchsorted(starts, items, side="right") - 1]
        lengths = np.minimum(np.asarray(dataset.lengths)[items], dataset.max_seq_len)
        batches: list[tuple[int, list[int]]] = []
        for t in range(len(self.type_names)):
            mine = items[item_type == t]
            mine = mine[np.argsort(lengths[item_type == t], kind="stable")]
            batches += [(t, mine[i:i + batch_size].tolist()) for i in range(0, len(mine), batch_size)]
        self.n_items = int(len(items))
        self.items_per_type = {self.type_names[t]: int((item_type == t).sum()) for t in range(len(self.type_names))}
        self.per_rank = math.ceil(len(batches) / world_size)
        self.batches = batches[rank::world_size]

    @classmethod
    def build(cls, data_config: str | os.PathLike, *, max_seq_len: int, batch_size: int, eval_items: int | None,
              seed: int, pad_id: int, world_size: int, rank: int) -> "EvalData":
        """Reads the config (indexes must exist: ``data.loader.build_indexes`` on one rank first)."""
        sources = load_data_config(data_config)
        if any(s.ratio != 1.0 for s in sources):
            logger.info("--val_data_config %s: 'ratio' is ignored for validation (every record counts once)",
                        data_config)
        dataset = RecordDataset(sources, max_seq_len=max_seq_len)
        n = len(dataset)
        if eval_items is None or eval_items >= n:
            items = np.arange(n)
        else:
            items = np.sort(np.random.default_rng([seed, 7]).choice(n, size=eval_items, replace=False))
        ev = cls(dataset, items, batch_size=batch_size, pad_id=pad_id, world_size=world_size, rank=rank)
        logger.info("validation data %s: %d of %d items (%s), %d batches of <= %d per rank", data_config,
                    ev.n_items, n, ", ".join(f"{t} {c}" for t, c in ev.items_per_type.items()), ev.per_rank,
                    batch_size)
        return ev

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]] | None]:
        for t, idx in self.batches:
            yield t, collate([self.dataset[i] for i in idx], max_seq_len=self.dataset.max_seq_len,
                             pad_id=self.pad_id)
        for _ in range(self.per_rank - len(self.batches)):
            yield None

"""Builds the training data pipeline from a data config: dataset, resumable sampler, DataLoader.

    data = build_train_data("configs/data.yaml", max_seq_len=4096, micro_batch_size=4, accum_iter=2,
                            world_size=world, rank=rank, seed=0, length_clustering=True, packing=False,
                            num_workers=4, pin_mem=True, pad_id=tokenizer.pad_id)
    data.sampler.load_state_dict(ckpt["sampler"])        # when resuming
    for epoch in range(data.sampler.epoch, epochs):
        data.sampler.set_epoch(epoch)                    # same epoch keeps the restored step
        for batch in data.loader:                        # micro-batch dicts, see data.collate
            ...                                          # accum_iter micro-batches = one optimizer step
            ckpt["sampler"] = data.sampler.state_dict()  # exact: counts the batches received here

``loader`` is a ``torch.utils.data.DataLoader`` whose ``batch_sampler`` is the sampler. Workers fetch
micro-batches ahead of use, which moves the sampler's own cursor ahead; the loader therefore sets the
sampler's position from the batches it has actually handed to the caller, so ``state_dict()`` taken
between steps is exact. ``pin_memory`` is used only when asked for and CUDA is available. Iterating
never draws from the global torch RNG (the loader has its own generator).

With several ranks, build missing indexes first on one rank per machine (``build_indexes``) and barrier:
a file lock makes the builders of machines that share a file system build each index once, and every
index is installed by an atomic rename (data/records.py), so no rank ever reads a half-written one.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from data.collate import collate
from data.data_config import load_data_config
from data.dataset import RecordDataset
from data.records import open_index
from data.sampler import ResumableBatchSampler
from data.stop_signals import worker_ignoring

logger = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ResumableBatchSampler that keeps the sampler's position at the batches
    handed out (not the ones prefetched by workers)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler: ResumableBatchSampler = self.batch_sampler
        start = sampler.step
        it = super().__iter__()
        sampler.note_consumed(start, 0)  # creating the iterator may have prefetched
        for n, batch in enumerate(it, 1):
            sampler.note_consumed(start, n)
            yield batch


@dataclass
class TrainData:
    dataset: RecordDataset
    sampler: ResumableBatchSampler
    loader: ResumableDataLoader


def build_indexes(data_config_path: str | os.PathLike) -> None:
    """Builds every missing or stale ``{record}.index/`` of a data config (call on one rank per machine)."""
    for src in load_data_config(data_config_path):
        open_index(src.path)


def build_train_data(data_config_path: str | os.PathLike, *, max_seq_len: int, micro_batch_size: int,
                     accum_iter: int, world_size: int, rank: int, seed: int, length_clustering: bool = True,
                     packing: bool = False, num_workers: int = 0, pin_mem: bool = False, pad_id: int,
                     pad_to_max_len: bool = False, worker_ignores: Sequence[signal.Signals] = ()) -> TrainData:
    """Dataset + sampler + DataLoader for one rank. See data.sampler for the order and resume rules,
    data.collate for the batch dict, data.packing for the packed attention mask. ``worker_ignores``: stop
    signals the loader's workers ignore (their parent acts on them; data/stop_signals.py)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sources = load_data_config(data_config_path)
    dataset = RecordDataset(sources, max_seq_len=max_seq_len)
    sampler = ResumableBatchSampler(dataset, micro_batch_size=micro_batch_size, accum_iter=accum_iter,
                                    world_size=world_size, rank=rank, seed=seed,
                                    length_clustering=length_clustering)
    pin = bool(pin_mem) and torch.cuda.is_available()
    if pin_mem and not pin:
        logger.info("pin_mem requested but CUDA is not available; not pinning memory")
    # Its own generator: a DataLoader draws each iteration's worker base seed from it, and from the global
    # torch RNG without one, which would shift the dropout stream of a resumed run against an unbroken one.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    loader = ResumableDataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin, generator=generator,
        worker_init_fn=worker_ignoring(worker_ignores) if num_workers else None,
        collate_fn=functools.partial(collate, max_seq_len=max_seq_len, pad_id=pad_id, packing=packing,
                                     pad_to_max_len=pad_to_max_len))
    logger.info("train data: %d items, %d types %s, global batch %d, %d steps per epoch, rank %d of %d, "
                "clustering %s, packing %s", len(dataset), len(dataset.type_names), dataset.type_names,
                sampler.global_batch_size, sampler.steps_per_epoch, rank, world_size, length_clustering, packing)
    return TrainData(dataset=dataset, sampler=sampler, loader=loader)

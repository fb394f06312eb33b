"""The CPU half of pre-tokenization in worker processes: decode + preprocess images, encode text.

``prepare_stream(processor, items, base_dir, num_workers)`` turns input items (in id order) into
:class:`Prepared` results in the same order. With ``num_workers > 0`` the items go to a process pool in
small chunks, a bounded number ahead of the consumer, so memory stays flat and the work overlaps the
VQGAN encode in the main process. Every failure is a per-item result, never an exception:

- an item the processor rejects (bad input: ``ItemError``, ``ImageLoadError``, ``VideoLoadError``) -> its
  message and reason;
- any other exception raised while preparing an item -> ``bug``, its traceback: not bad data, so the caller
  stops the run on it (data/pretok_errors.py);
- a worker process that dies (a segfault in an image decoder, the OOM killer): the pool is rebuilt and
  the items that were in flight are re-run one at a time, so exactly the item that kills a worker is
  rejected (reason ``crash``) and all others come back as usual.

Messages and reasons depend only on the item, so the output is the same for any ``num_workers``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing as mp
import os
import signal
import traceback
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from data.inputs.item import InputItem
from data.pretok_errors import classify, is_bad_input

logger = logging.getLogger(__name__)

CHUNK = 4             # items per task sent to a worker: amortises IPC without hurting order latency
AHEAD_PER_WORKER = 4  # chunks in flight per worker (bounds memory: prepared images wait in the pipe)
CRASH_MESSAGE = ("the worker process died while preparing this item (a crash in an image decoder, or "
                 "out of memory); the item was retried alone and killed its worker again")


@dataclass
class Prepared:
    """The result for one input item: ``prepared`` (the processor's PreparedItem), ``error`` (a rejection,
    with its ``reason``) or ``bug``."""

    item: InputItem
    prepared: Any = None
    error: str | None = None
    reason: str | None = None
    bug: str | None = None  # the traceback of an exception that is not bad input: the run must stop on it


def prepare_one(processor, it: InputItem, base_dir: Path | None) -> Prepared:
    if it.error is not None:
        return Prepared(it, error=it.error, reason="input")
    try:
        return Prepared(it, prepared=processor.prepare(it.item, base_dir))
    except Exception as e:
        if not is_bad_input(e):  # a bug, not bad data: the run stops on it (see data/pretok_errors.py)
            return Prepared(it, bug=traceback.format_exc())
        return Prepared(it, error=f"{it.where}: {e}", reason=classify(e))


# Worker-process state, set by the pool initializer.
_processor = None
_base_dir: Path | None = None


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive a killed parent: it would keep the rank's lock (inherited by fork) and
    block the re-run. Linux: PR_SET_PDEATHSIG; elsewhere the pool's own shutdown has to do."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(processor, base_dir: Path | None, parent_pid: int) -> None:
    global _processor, _base_dir
    _die_with_parent(parent_pid)
    _processor, _base_dir = processor, base_dir


def _prepare_chunk(chunk: list[InputItem]) -> list[tuple]:
    # The input item itself is not sent back (the parent has it; webdataset images are large).
    out = []
    for it in chunk:
        p = prepare_one(_processor, it, _base_dir)
        out.append((p.prepared, p.error, p.reason, p.bug))
    return out


def _attach(chunk: list[InputItem], results: list[tuple]) -> list[Prepared]:
    return [Prepared(it, *r) for it, r in zip(chunk, results)]


class _Pool:
    def __init__(self, processor, base_dir: Path | None, workers: int):
        self.args = (processor, base_dir, os.getpid())
        self.workers = workers
        self.ex = self._new()

    def _new(self) -> ProcessPoolExecutor:
        # fork: workers start in milliseconds and inherit the processor (text tokenizer) without pickling.
        # They never touch torch/CUDA state, which is what makes forking a process with threads unsafe,
        # and end with os._exit, so file buffers inherited from the parent are never flushed twice.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        # No cyclic garbage crosses the fork: a child freeing an object that holds FFmpeg decoder state of
        # the parent (a PyAV frame whose side data was read) can hang or crash. Once per pool, ~0.2 s.
        gc.collect()
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=self.args)

    def rebuild(self) -> None:
        self.ex.shutdown(wait=False, cancel_futures=True)
        self.ex = self._new()

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


def _alone(pool: _Pool, it: InputItem) -> Prepared:
    """Runs one item in the pool; if the pool breaks, the item is the culprit."""
    try:
        return _attach([it], pool.ex.submit(_prepare_chunk, [it]).result())[0]
    except BrokenProcessPool:
        logger.warning("%s: a worker process died on this item; it is rejected", it.where)
        pool.rebuild()
        return Prepared(it, error=f"{it.where}: {CRASH_MESSAGE}", reason="crash")


class PrepareStream:
    """Iterable of Prepared results in input order. The worker processes fork in ``__init__`` (call it
    before loading the VQGAN: the children then start from a process without torch thread pools)."""

    def __init__(self, processor, items: Iterable[InputItem], base_dir: Path | None, num_workers: int):
        self.processor, self.base_dir, self.num_workers = processor, base_dir, num_workers
        self.source = iter(items)
        self.inflight: deque[tuple[list[InputItem], Future]] = deque()
        self.pool = None
        if num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.pool = _Pool(processor, base_dir, num_workers)
            self._refill()

    def _refill(self) -> None:
        while len(self.inflight) < AHEAD_PER_WORKER * self.num_workers:
            chunk = list(islice(self.source, CHUNK))
            if not chunk:
                return
            self.inflight.append((chunk, self.pool.ex.submit(_prepare_chunk, chunk)))

    def __iter__(self) -> Iterator[Prepared]:
        if self.pool is None:
            for it in self.source:
                yield prepare_one(self.processor, it, self.base_dir)
            return
        try:
            while self.inflight:
                chunk, fut = self.inflight.popleft()
                try:
                    results = fut.result()
                except BrokenProcessPool:
                    yield from self._recover(chunk, fut)
                    continue
                yield from _attach(chunk, results)
                self._refill()
        finally:
            self.close()

    def _recover(self, chunk: list[InputItem], fut: Future) -> Iterator[Prepared]:
        logger.warning("a worker process died; re-running the %d chunk(s) in flight one item at a time "
                       "to find the item that kills it", len(self.inflight) + 1)
        retry = [(chunk, fut)] + list(self.inflight)
        self.inflight.clear()
        self.pool.rebuild()
        for c, f in retry:
            if f.done() and not f.cancelled() and f.exception() is None:
                yield from _attach(c, f.result())
            else:
                for it in c:
                    yield _alone(self.pool, it)
        self._refill()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def prepare_stream(processor, items: Iterable[InputItem], base_dir: Path | None,
                   num_workers: int) -> PrepareStream:
    """Prepared results of ``items``, in order; see the module docstring."""
    return PrepareStream(processor, items, base_dir, num_workers)

"""Deterministic, resumable batch sampling: type-pure global batches, length clustering, rank slices.

Terms. ``G = micro_batch_size * accum_iter * world_size`` items form one *global batch* (one optimizer
step over all ranks). Rank ``r`` takes items ``[r * P, (r + 1) * P)`` of each global batch, with
``P = micro_batch_size * accum_iter``, and yields them as ``accum_iter`` micro-batches of
``micro_batch_size`` dataset indices. Concatenating the micro-batches of rank 0, 1, ... in order gives
the global batch.

The plan of an epoch depends only on (dataset, seed, epoch, G, length_clustering), never on
``world_size``, ``rank``, ``micro_batch_size`` or ``accum_iter`` alone:

1. Draw. Each source (``META`` entry) contributes ``int(n * ratio)`` items: every item
   ``floor(ratio)`` times, plus a random subset without repeats for the rest, so below 1 a fresh
   subset is drawn each epoch and above 1 items repeat (each ``floor(ratio)`` or ``floor(ratio) + 1``
   times). The drawn items of all sources of one ``type`` are shuffled together. Random numbers come
   from ``numpy.random.default_rng([seed, epoch, 0])``.
2. Batch. Per type, the last ``count % G`` items of the shuffled order are left out this epoch (a random
   set, different each epoch: "the incomplete global batch is dropped" without always dropping the
   same, e.g. the longest, items). With ``length_clustering`` the rest is sorted by length (stable, so
   equal lengths stay in random order; lengths clipped at ``max_seq_len``) and cut into global batches
   of neighbouring lengths; without it, cut in the shuffled order. A global batch never mixes types.
3. Order. The global batches of all types are shuffled together (``default_rng([seed, epoch, 1])``),
   so training does not walk from short to long items or type by type.

State and resume. ``state_dict()`` is ``{"epoch", "step", "global_batch_size", "segments", "seed",
"num_items", "length_clustering"}``; ``step`` counts global batches fully consumed in the epoch.
``load_state_dict`` makes the next iteration start at global batch ``step`` of the same plan:

* Same G (any world_size / micro_batch_size / accum_iter with the same product): exactly the remaining
  global batches, in the same order; no item replayed or skipped.
* Different G: the draws (step 1) of the first ``step`` global batches, those consumed, are not used
  again this epoch. Every other draw of the epoch (including those the old plan had dropped as its
  remainder) is batched again by step 2 with the new G, and ordered by step 3 with
  ``default_rng([seed, epoch, 1 + k])`` after the k-th size change in the epoch (k = 1, 2, ...). So
  nothing is replayed and nothing is skipped except the new per-type remainder (fewer than G draws per
  type); an item drawn twice (ratio > 1) and consumed once still comes once more. Such changes
  are recorded in ``segments`` (``[[G_old, steps consumed with G_old], ...]``) so that a later resume,
  with yet another G, rebuilds the same plan. ``step`` keeps counting all global batches of the epoch;
  ``steps_per_epoch`` is then this epoch's actual count. The next epoch is the normal plan for the new G.
* A changed seed, clustering flag or dataset cannot be honoured exactly: a change of the seed, the flag
  or the item count is logged as a warning (other dataset changes are not detected) and the iteration
  starts at ``step`` of the new plan (items may repeat or be missed in that epoch only).

Consumption is counted when a micro-batch is handed out: iterating this sampler directly marks each
micro-batch consumed as it is yielded (after the last micro-batch of a global batch, ``step`` has
advanced). A DataLoader with workers asks for micro-batches ahead of use, so ``data.loader`` sets the
position from the batches the trainer actually received (``note_consumed``); use its loader.

Epochs. Call ``set_epoch(e)`` before each epoch (a new epoch restarts at step 0; the same epoch keeps
the restored step). Iterating an epoch that is fully consumed yields nothing.
"""

from __future__ import annotations

import logging
from typing import Iterator, Protocol, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class _SampledDataset(Protocol):
    """What the sampler reads from a dataset (RecordDataset provides it)."""

    sources: Sequence  # each with a .ratio
    source_ranges: list[tuple[int, int]]
    source_type: list[int]
    type_names: list[str]
    lengths: np.ndarray
    max_seq_len: int

    def __len__(self) -> int: ...


def _index_dtype(n: int) -> type:
    # int32 halves the plan's memory and speeds up its gathers (10M items: 40 MB per index array).
    return np.int32 if n < 2**31 else np.int64


def draw_epoch(dataset: _SampledDataset, seed: int, epoch: int) -> list[np.ndarray]:
    """Step 1 of the plan: per type, the dataset indices drawn for this epoch, in a random order."""
    rng = np.random.default_rng([seed, epoch, 0])
    dt = _index_dtype(len(dataset))
    parts: list[list[np.ndarray]] = [[] for _ in dataset.type_names]
    for (start, stop), t, spec in zip(dataset.source_ranges, dataset.source_type, dataset.sources):
        n = stop - start
        count = int(n * spec.ratio)
        if n == 0 or count == 0:
            continue
        reps, rest = divmod(count, n)
        parts[t].extend([np.arange(start, stop, dtype=dt)] * reps)
        if rest:
            parts[t].append((start + rng.choice(n, size=rest, replace=False)).astype(dt))
    out = []
    for p in parts:
        items = np.concatenate(p) if p else np.zeros(0, dtype=dt)  # a copy: shuffling it is safe
        rng.shuffle(items)
        out.append(items)
    return out


def sort_keys(lengths: np.ndarray, max_seq_len: int | None) -> np.ndarray:
    """Clustering keys: lengths clipped at max_seq_len, as uint16 when they fit, because numpy's stable
    argsort is a radix sort for 16-bit keys (10M items: ~0.1 s instead of ~1 s)."""
    keys = lengths if max_seq_len is None else np.minimum(lengths, max_seq_len)
    return keys.astype(np.uint16) if keys.size and int(keys.max()) < 2**16 else keys


def make_global_batches(slots_by_type: list[np.ndarray], slot_key: np.ndarray, global_batch_size: int,
                        length_clustering: bool, rng: np.random.Generator) -> np.ndarray:
    """Steps 2-3 of the plan: [num_batches, G] slot ids (positions in the epoch's draw)."""
    G = global_batch_size
    dt = slots_by_type[0].dtype if slots_by_type else np.int64
    batches = []
    for slots in slots_by_type:
        nb = slots.shape[0] // G
        s = slots[:nb * G]  # drop this type's remainder: the tail of a random order
        if length_clustering and nb > 1:
            s = s[np.argsort(slot_key[s], kind="stable")]
        batches.append(s.reshape(nb, G))
    allb = np.concatenate(batches) if batches else np.zeros((0, G), dtype=dt)
    return allb[rng.permutation(allb.shape[0])]


class ResumableBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices) of the current epoch; see the module
    docstring for the plan and the resume guarantees."""

    def __init__(self, dataset: _SampledDataset, *, micro_batch_size: int, accum_iter: int, world_size: int,
                 rank: int, seed: int, length_clustering: bool = True):
        for name, v in (("micro_batch_size", micro_batch_size), ("accum_iter", accum_iter),
                        ("world_size", world_size)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.accum_iter = int(accum_iter)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.length_clustering = bool(length_clustering)
        self.global_batch_size = self.micro_batch_size * self.accum_iter * self.world_size
        self.epoch = 0
        self.step = 0
        self._segments: list[tuple[int, int]] = []
        self._cache_key: tuple | None = None
        self._cache: tuple[np.ndarray, int] | None = None

    # ------------------------------------------------------------------------------------- plan

    def _plan(self) -> tuple[np.ndarray, int]:
        """([batches, G] dataset indices of the current segment, global batches consumed before it)."""
        key = (self.epoch, tuple(self._segments), self.global_batch_size, self.seed, self.length_clustering,
               len(self.dataset))
        if self._cache_key != key:
            drawn = draw_epoch(self.dataset, self.seed, self.epoch)
            sizes = [d.shape[0] for d in drawn]
            dt = _index_dtype(sum(sizes))
            slot_item = np.concatenate(drawn) if drawn else np.zeros(0, dtype=dt)
            del drawn
            bounds = np.cumsum([0] + sizes)
            avail = [np.arange(bounds[t], bounds[t + 1], dtype=dt) for t in range(len(sizes))]
            slot_key = sort_keys(np.asarray(self.dataset.lengths), getattr(self.dataset, "max_seq_len", None))
            slot_key = slot_key[slot_item]
            done = 0
            for k, (g, consumed) in enumerate(self._segments):
                b = make_global_batches(avail, slot_key, g, self.length_clustering,
                                        np.random.default_rng([self.seed, self.epoch, 1 + k]))
                used = np.zeros(slot_item.shape[0], dtype=bool)
                used[b[:consumed].ravel()] = True
                avail = [a[~used[a]] for a in avail]
                done += consumed
            cur = make_global_batches(avail, slot_key, self.global_batch_size, self.length_clustering,
                                      np.random.default_rng([self.seed, self.epoch, 1 + len(self._segments)]))
            del avail, slot_key
            self._cache = (slot_item[cur], done)
            self._cache_key = key
        return self._cache

    def global_batches(self) -> np.ndarray:
        """All global batches of the current epoch from the current step on (dataset indices [n, G])."""
        plan, done = self._plan()
        return plan[max(self.step - done, 0):]

    def type_of_step(self, step: int) -> int:
        """Index into ``dataset.type_names`` of global batch ``step`` (0-based, not yet consumed) of the
        current epoch. Reads the cached plan only: no random numbers drawn, position unchanged."""
        plan, done = self._plan()
        if not 0 <= step - done < plan.shape[0]:
            raise IndexError(f"sampler: epoch {self.epoch} has no global batch {step} to come "
                             f"(steps {done}..{done + plan.shape[0] - 1})")
        item = int(plan[step - done, 0])
        starts = [start for start, _ in self.dataset.source_ranges]
        return self.dataset.source_type[int(np.searchsorted(starts, item, side="right")) - 1]

    @property
    def steps_per_epoch(self) -> int:
        """Global batches in the current epoch (consumed ones included)."""
        if not self._segments:
            # Cheap form of len(plan): per type, floor(drawn / G).
            per_type = np.zeros(len(self.dataset.type_names), dtype=np.int64)
            for (start, stop), t, spec in zip(self.dataset.source_ranges, self.dataset.source_type,
                                              self.dataset.sources):
                per_type[t] += int((stop - start) * spec.ratio)
            return int((per_type // self.global_batch_size).sum())
        plan, done = self._plan()
        return done + plan.shape[0]

    def __len__(self) -> int:
        """Micro-batches this rank yields over a whole epoch (after a mid-epoch resume, fewer remain:
        ``(steps_per_epoch - step) * accum_iter``)."""
        return self.steps_per_epoch * self.accum_iter

    # -------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[list[int]]:
        plan, done = self._plan()
        start = self.step - done
        if start >= plan.shape[0]:
            logger.warning("sampler: epoch %d is fully consumed (step %d of %d); call set_epoch(epoch + 1) "
                           "before iterating again", self.epoch, self.step, done + plan.shape[0])
        P, mbs = self.micro_batch_size * self.accum_iter, self.micro_batch_size
        lo = self.rank * P
        for s in range(max(start, 0), plan.shape[0]):
            mine = plan[s, lo:lo + P]
            for m in range(self.accum_iter):
                self.step = done + s + (m == self.accum_iter - 1)
                yield mine[m * mbs:(m + 1) * mbs].tolist()

    def note_consumed(self, start_step: int, micro_batches: int) -> None:
        """Sets the position to ``micro_batches`` micro-batches received since an iteration that began
        at ``start_step`` (whole global batches only count)."""
        self.step = start_step + micro_batches // self.accum_iter

    # ------------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.step = 0
            self._segments = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "global_batch_size": self.global_batch_size,
                "segments": [list(s) for s in self._segments], "seed": self.seed,
                "num_items": len(self.dataset), "length_clustering": self.length_clustering}

    def load_state_dict(self, sd: dict) -> None:
        epoch, step = int(sd["epoch"]), int(sd["step"])
        if step < 0:
            raise ValueError(f"sampler state has a negative step {step}")
        segments = [(int(g), int(n)) for g, n in sd.get("segments", [])]
        old_g = int(sd.get("global_batch_size", self.global_batch_size))
        for what, old, new in (("seed", sd.get("seed", self.seed), self.seed),
                               ("number of items", sd.get("num_items", len(self.dataset)), len(self.dataset)),
                               ("length_clustering", sd.get("length_clustering", self.length_clustering),
                                self.length_clustering)):
            if old != new:
                logger.warning("sampler: the %s changed since the checkpoint (%r -> %r); resuming at epoch %d "
                               "step %d of the new plan, so this epoch may repeat or miss items", what, old, new,
                               epoch, step)
        if old_g != self.global_batch_size:
            consumed_here = step - sum(n for _, n in segments)
            if consumed_here > 0:
                segments.append((old_g, consumed_here))
            logger.info("sampler: global batch size changed %d -> %d in epoch %d at step %d; the items not "
                        "yet consumed this epoch are batched again with the new size", old_g,
                        self.global_batch_size, epoch, step)
        self.epoch, self.step, self._segments = epoch, step, segments

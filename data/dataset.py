"""The training dataset: the items of every record file of a data config, as one indexable sequence.

``RecordDataset(sources, max_seq_len)`` concatenates the sources in ``META`` order: item ``i`` of the
dataset is item ``i - start`` of the source whose ``[start, stop)`` range holds it (``source_ranges``).

Opening is O(files), not O(items), in Python work: each record file is opened through its memory-mapped
index (``{record}.index/`` of data.records, built on first use if missing or stale), the ``len`` column is read
into one int32 array (``lengths``, what the sampler needs), and the other columns stay memory-mapped
and are only touched by ``__getitem__``. 10M records open in well under 2 s and 300 MB RSS (see
bench/bench_data_open.py and bench/RESULTS.md).

Validation at open (each error is a ``RecordFormatError`` naming the record file and the item):
  * a token shard that is missing, is not a shard (magic/version), or is shorter than its records
    claim: the largest ``offset + 2 * len`` per shard, from the index columns read in chunks, against
    the shard's size;
  * a ``len`` that overlaps the next item of the same shard (consecutive records, increasing offsets);
  * an item with ``len`` < 1; a file named both by shard records and by pickle records.
Validation at read (``__getitem__``), where checking at open would cost O(items) file opens (Lumina's
per-item ``.pkl`` records: 10M files cannot be stat'ed at open):
  * a missing ``.pkl``, an unreadable or unsafe pickle, a token count different from the record's ``len``.
An error is raised, never answered with another item (Lumina returns item ``index - 1`` on errors).

Worker safety: the memory maps (index columns, shards) are opened lazily in the process that reads,
and dropped when the dataset is pickled (DataLoader workers under the ``spawn`` start method), so a
worker never receives a copy of a mapped array.

Lumina ``.pkl`` records name one file per item; their index keeps the names in a memory-mapped
``files.npy`` (see data/records.py), so they open as fast as shard records.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.data_config import DataSource
from data.lumina_pickle import UnsafePickleError, load_lumina_item
from data.records import FileNames, RecordFormatError, ShardReader, ensure_index

logger = logging.getLogger(__name__)

# Rows of the index read per chunk during open-time validation: 1M rows of (file, offset, len) is
# 16 MB of temporary arrays, so validating 10M records stays far under the RSS budget.
_CHUNK_ROWS = 1 << 20


def _npy_chunks(path: Path, chunk: int) -> Iterator[np.ndarray]:
    """Yields a 1-D ``.npy`` file in chunks with plain reads (no memory map, so the pages read do not
    stay in this process's RSS)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if len(shape) != 1:
            raise RecordFormatError(f"{path}: expected a 1-D index column, got shape {shape}")
        left = shape[0]
        while left > 0:
            n = min(chunk, left)
            a = np.fromfile(f, dtype=dtype, count=n)
            if a.shape[0] != n:
                raise RecordFormatError(f"{path}: index column is truncated ({left - a.shape[0]} rows missing)")
            left -= n
            yield a


def _index_chunks(index_dir: Path) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (first row, file, offset, len) chunks of an index."""
    start = 0
    for f, off, ln in zip(_npy_chunks(index_dir / "file.npy", _CHUNK_ROWS),
                          _npy_chunks(index_dir / "offset.npy", _CHUNK_ROWS),
                          _npy_chunks(index_dir / "len.npy", _CHUNK_ROWS)):
        yield start, f, off, ln
        start += f.shape[0]


@dataclass(frozen=True)
class _Columns:
    """The memory-mapped index columns of one record file (pages are touched only when read)."""

    id: np.ndarray
    file: np.ndarray
    offset: np.ndarray
    len: np.ndarray

    @classmethod
    def open(cls, index_dir: Path) -> "_Columns":
        return cls(**{c: np.load(index_dir / f"{c}.npy", mmap_mode="r", allow_pickle=False)
                      for c in ("id", "file", "offset", "len")})


@dataclass
class _Source:
    """One opened record file. ``files`` are the index's file names as stored (relative to the record
    file's directory, or absolute), resolved by ``path_of`` only when used: Lumina records name one
    file per item, and making millions of Path objects at open took 15 s per 1M records."""

    spec: DataSource
    start: int
    stop: int
    type_id: int
    index_dir: Path
    files: FileNames
    _cols: _Columns | None = field(default=None, repr=False)
    _shards: dict[int, ShardReader] = field(default_factory=dict, repr=False)

    @property
    def record_path(self) -> Path:
        return self.spec.path

    def columns(self) -> _Columns:
        if self._cols is None:
            self._cols = _Columns.open(self.index_dir)
        return self._cols

    def shard(self, file_idx: int) -> ShardReader:
        r = self._shards.get(file_idx)
        if r is None:
            r = self._shards[file_idx] = ShardReader(self.path_of(file_idx))
        return r

    def path_of(self, file_idx: int) -> Path:
        p = Path(self.files[file_idx])
        return p if p.is_absolute() else self.record_path.parent / p

    def drop_maps(self) -> None:
        self._cols = None
        self._shards = {}


def _validate_source(src: _Source) -> None:
    """Open-time checks of one source (see the module docstring). O(files) file system calls."""
    n_files = len(src.files)
    shard_end = None  # per file: largest offset + 2*len over its shard records, -1 if none
    has_pkl = None
    n_rows = 0
    prev = None  # (file, offset, end) of the previous chunk's last row
    for row0, f, off, ln in _index_chunks(src.index_dir):
        n_rows += f.shape[0]
        _check_no_overlap(src, row0, f, off, off + 2 * ln.astype(np.int64), prev)
        prev = (f[-1:], off[-1:], off[-1:] + 2 * ln[-1:].astype(np.int64))
        bad = np.flatnonzero(ln < 1)
        if bad.size:
            _raise_for_row(src, row0 + int(bad[0]), "has len < 1 (an empty item cannot be trained on)")
        if f.size and (int(f.min()) < 0 or int(f.max()) >= n_files):
            bad_row = row0 + int(np.flatnonzero((f < 0) | (f >= n_files))[0])
            _raise_for_row(src, bad_row, f"names file #{int(f[bad_row - row0])}, but the index lists {n_files}")
        is_shard = off >= 0
        if not is_shard.all():
            if has_pkl is None:
                has_pkl = np.zeros(n_files, dtype=bool)
            has_pkl[f[~is_shard]] = True
        if is_shard.any():
            if shard_end is None:
                shard_end = np.full(n_files, -1, dtype=np.int64)
            fs, ends = f[is_shard], off[is_shard] + 2 * ln[is_shard].astype(np.int64)
            # Records of one shard are contiguous runs (one rank's records in id order), so a max per
            # run (vectorised) and then per file touches each row once.
            starts = np.concatenate(([0], np.flatnonzero(fs[1:] != fs[:-1]) + 1))
            np.maximum.at(shard_end, fs[starts], np.maximum.reduceat(ends, starts))
    if n_rows != src.stop - src.start:
        raise RecordFormatError(f"record file {src.record_path}: index {src.index_dir} has {n_rows} rows in "
                                f"file.npy but {src.stop - src.start} in len.npy; rebuild it with "
                                f"pre_tokenize/concat_record.py")
    if shard_end is None:
        return
    for fi in np.flatnonzero(shard_end >= 0):
        fi = int(fi)
        path = src.path_of(fi)
        if has_pkl is not None and has_pkl[fi]:
            _raise_for_row(src, _first_row_of_file(src, fi), f"is a per-item pickle record, but {path} is also "
                           f"used as a token shard by other records")
        if not path.is_file():
            _raise_for_row(src, _first_row_of_file(src, fi), f"points at token shard {path}, which does not exist")
        try:
            elements = ShardReader(path).num_elements
        except RecordFormatError as e:
            _raise_for_row(src, _first_row_of_file(src, fi), f"points at a bad token shard: {e}")
        if int(shard_end[fi]) > elements:
            row = _first_row_past(src, fi, elements)
            _raise_for_row(src, row, f"ends past the end of token shard {path}, which holds {elements} "
                           f"int32 elements after its header: the shard is shorter than its records claim "
                           f"(truncated copy, or records from another run?)")


def _check_no_overlap(src: _Source, row0: int, f: np.ndarray, off: np.ndarray, end: np.ndarray, prev) -> None:
    """A ``len`` mismatch shows where a record claims tokens past the start of the next record of the same
    shard (consecutive records with increasing offsets: the writer's layout). Gaps are allowed (a
    filtered record file skips items); a too-small ``len`` there cannot be seen without reading tokens."""
    if prev is not None:
        f, off, end = np.concatenate((prev[0], f)), np.concatenate((prev[1], off)), np.concatenate((prev[2], end))
        row0 -= 1
    nxt = (f[1:] == f[:-1]) & (off[:-1] >= 0) & (off[1:] > off[:-1])
    hit = np.flatnonzero(nxt & (end[:-1] > off[1:]))
    if hit.size:
        k = int(hit[0])
        _raise_for_row(src, row0 + k, f"its len claims shard elements up to {int(end[k])}, past the start of the "
                       f"next record's item at offset {int(off[k + 1])} (row {row0 + k + 1}): the len does not "
                       f"match the shard")


def _first_row_of_file(src: _Source, fi: int) -> int:
    for row0, f, _, _ in _index_chunks(src.index_dir):
        hit = np.flatnonzero(f == fi)
        if hit.size:
            return row0 + int(hit[0])
    raise RecordFormatError(f"record file {src.record_path}: no record names file #{fi}")


def _first_row_past(src: _Source, fi: int, elements: int) -> int:
    for row0, f, off, ln in _index_chunks(src.index_dir):
        hit = np.flatnonzero((f == fi) & (off >= 0) & (off + 2 * ln.astype(np.int64) > elements))
        if hit.size:
            return row0 + int(hit[0])
    raise RecordFormatError(f"record file {src.record_path}: no record ends past element {elements}")


def _raise_for_row(src: _Source, row: int, what: str) -> None:
    c = src.columns()
    off, fi = int(c.offset[row]), int(c.file[row])
    where = f"offset {off}, " if off >= 0 else ""
    fname = src.path_of(fi) if 0 <= fi < len(src.files) else f"#{fi}"
    raise RecordFormatError(f"record file {src.record_path}, item id {int(c.id[row])} (row {row}, {where}"
                            f"len {int(c.len[row])}, file {fname}): {what}")


class RecordDataset:
    """All items of the given sources; ``dataset[i] -> {"input_ids", "labels"}`` (int64, at most
    ``max_seq_len`` tokens: longer items are truncated, their tail is not trained on).

    Attributes: ``sources`` (the DataSource list), ``source_ranges`` (``[start, stop)`` per source),
    ``type_names`` (distinct ``type`` values in order of first appearance), ``source_type`` (index into
    ``type_names`` per source), ``lengths`` (int32 token count of every item, as recorded, before
    truncation) and ``types`` (int32 index into ``type_names`` of every item, built on access).
    """

    def __init__(self, sources: Sequence[DataSource], max_seq_len: int):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if not sources:
            raise ValueError("RecordDataset needs at least one source")
        t0 = time.perf_counter()
        self.sources = list(sources)
        self.max_seq_len = int(max_seq_len)
        self.type_names: list[str] = []
        self._srcs: list[_Source] = []
        lengths = []
        start = 0
        for spec in self.sources:
            d, meta = ensure_index(spec.path)
            files = FileNames(d, meta)
            # A plain read, not the memory map: the sampler needs every length, and an anonymous copy
            # is counted once in RSS, where a fully touched map plus a copy would count twice.
            ln = np.load(d / "len.npy", allow_pickle=False)
            if spec.type not in self.type_names:
                self.type_names.append(spec.type)
            src = _Source(spec=spec, start=start, stop=start + int(ln.shape[0]),
                          type_id=self.type_names.index(spec.type), index_dir=d, files=files)
            _validate_source(src)
            src.drop_maps()
            self._srcs.append(src)
            lengths.append(ln.astype(np.int32, copy=False))
            start = src.stop
        self._lengths = np.concatenate(lengths) if len(lengths) > 1 else lengths[0]
        self._starts = np.array([s.start for s in self._srcs], dtype=np.int64)
        logger.info("opened %d items from %d record file(s) in %.2f s", len(self), len(self._srcs),
                    time.perf_counter() - t0)

    # ------------------------------------------------------------------------------- properties

    def __len__(self) -> int:
        return self._srcs[-1].stop

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:  # dropped by __getstate__ (worker copies); reload on demand
            self._lengths = np.concatenate([np.load(s.index_dir / "len.npy", allow_pickle=False)
                                            .astype(np.int32, copy=False) for s in self._srcs])
        return self._lengths

    @property
    def source_ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self._srcs]

    @property
    def source_type(self) -> list[int]:
        return [s.type_id for s in self._srcs]

    @property
    def types(self) -> np.ndarray:
        return np.repeat(np.array(self.source_type, dtype=np.int32),
                         [s.stop - s.start for s in self._srcs])

    # ------------------------------------------------------------------------------------ items

    def locate(self, i: int) -> tuple[_Source, int]:
        """(source, row within that source's record file) of dataset item ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"dataset index {i} out of range for {n} items")
        i = i % n
        s = self._srcs[int(np.searchsorted(self._starts, i, side="right")) - 1]
        return s, i - s.start

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        src, row = self.locate(int(i))
        cols = src.columns()
        rid, fi, off, n = int(cols.id[row]), int(cols.file[row]), int(cols.offset[row]), int(cols.len[row])
        path = src.path_of(fi)
        where = f"record file {src.record_path}, item id {rid} (row {row}, dataset index {int(i)})"
        if off >= 0:
            try:
                tokens, labels = src.shard(fi).read(off, n)
            except (OSError, RecordFormatError) as e:
                raise RecordFormatError(f"{where}: cannot read {n} tokens at offset {off} of shard {path}: {e}") from e
        else:
            try:
                tokens, labels = load_lumina_item(path)
            except FileNotFoundError as e:
                raise RecordFormatError(f"{where}: pickle file {path} does not exist") from e
            except (OSError, UnsafePickleError, pickle.UnpicklingError, ValueError) as e:
                raise RecordFormatError(f"{where}: cannot read pickle file {path}: {e}") from e
            if tokens.shape[0] != n:
                raise RecordFormatError(f"{where}: pickle file {path} holds {tokens.shape[0]} tokens, but the "
                                        f"record says len {n} (stale record file?)")
        L = self.max_seq_len
        return {"input_ids": tokens[:L], "labels": labels[:L]}

    # -------------------------------------------------------------------------------- pickling

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lengths"] = None
        state["_srcs"] = [_Source(spec=s.spec, start=s.start, stop=s.stop, type_id=s.type_id,
                                  index_dir=s.index_dir, files=s.files) for s in self._srcs]
        return state

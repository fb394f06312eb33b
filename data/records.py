"""On-disk formats of pre-tokenized data: token shards, record lines, and the compact record index.

Format contract (version 1). Other stages and users' data depend on it; change it only with a new version.

Token shard ``{r}-of-{S}-tokens.bin`` (one per pre-tokenization rank, append-only):
    bytes 0..7    magic ``b"LMGSHARD"``
    bytes 8..11   format version, uint32 little-endian (1)
    bytes 12..15  reserved, zero
    then, per item, ``len`` int32 token ids followed by ``len`` int32 labels (-100 = not trained on),
    little-endian. An item is addressed by ``offset``: the index, in int32 elements after the header,
    of its first token. Reading one item is one slice of a memory map: O(1), no pickle.

Record line (``{r}-of-{S}-record.jsonl``, one JSON object per line, in id order; ``record.json`` is a
JSON array of the same objects):
    {"id": int, "file": str, "len": int, "offset": int}
    ``file`` is relative to the directory of the record file. Lumina's own records carry
    ``{"file": "/path/item.pkl", "len": int, "id": int}`` without ``offset``; those point at one
    pickle per item, read through ``data.lumina_pickle``.

Record index ``{record}.index/`` beside a record file (``record.json.index/``), written by
``concat_record.py`` or on first open, memory-mapped by the trainer so 10M records open in O(1):
    meta.json    {"format": "lumina-stack-record-index", "version": 1, "count": N, "files": [...],
                  "n_files": int, "record_size": bytes, "record_mtime_ns": int}
    files.npy    only when there are more than MAX_NAMES_IN_META distinct files (Lumina's one .pkl per
                 item): the names as a fixed-width UTF-8 byte array, memory-mapped, and ``"files"`` is
                 null in meta.json. Opening then stays O(1) instead of parsing 10M names.
    id.npy       int64[N]   item ids
    file.npy     int32[N]   index into meta["files"] (paths relative to the record file's directory)
    offset.npy   int64[N]   element offset in the shard, -1 for per-item pickle records
    len.npy      int32[N]   number of tokens
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

SHARD_MAGIC = b"LMGSHARD"
SHARD_VERSION = 1
SHARD_HEADER = struct.pack("<8sII", SHARD_MAGIC, SHARD_VERSION, 0)
SHARD_HEADER_BYTES = len(SHARD_HEADER)  # 16
IGNORE_INDEX = -100

logger = logging.getLogger(__name__)

INDEX_FORMAT = "lumina-stack-record-index"
INDEX_VERSION = 1
MAX_NAMES_IN_META = 4096


class RecordFormatError(ValueError):
    """A record, shard or index on disk does not match the format (names the file and the item)."""


@dataclass(frozen=True)
class Record:
    """One pre-tokenized item. ``offset`` is None for Lumina per-item pickle records."""

    id: int
    file: str
    len: int
    offset: int | None = None

    def to_json(self) -> str:
        d = asdict(self)
        if self.offset is None:
            del d["offset"]
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "Record":
        try:
            offset = d.get("offset")
            return cls(id=int(d["id"]), file=str(d["file"]), len=int(d["len"]),
                       offset=None if offset is None else int(offset))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordFormatError(f"{where}: bad record {d!r}: needs integer 'id' and 'len' and a "
                                    f"string 'file' ({e})") from e


def shard_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-tokens.bin"


def record_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-record.jsonl"


def errors_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-errors.jsonl"


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename or a new file in ``path`` durable (the directory entry, not only the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- shards


class ShardWriter:
    """Appends items to a token shard. ``truncate_to`` (bytes) cuts off a torn tail on resume."""

    def __init__(self, path: str | os.PathLike, truncate_to: int | None = None):
        self.path = Path(path)
        fresh = not self.path.exists() or self.path.stat().st_size < SHARD_HEADER_BYTES
        self._f = open(self.path, "r+b" if not fresh else "w+b")
        if fresh:
            self._f.write(SHARD_HEADER)
        else:
            check_shard_header(self._f.read(SHARD_HEADER_BYTES), self.path)
        if truncate_to is not None and not fresh:
            self._f.truncate(max(truncate_to, SHARD_HEADER_BYTES))
        self._f.seek(0, os.SEEK_END)

    @property
    def next_offset(self) -> int:
        """Element offset the next appended item will get."""
        return (self._f.tell() - SHARD_HEADER_BYTES) // 4

    def append(self, tokens: Iterable[int], labels: Iterable[int]) -> int:
        t = np.asarray(tokens, dtype="<i4")
        lab = np.asarray(labels, dtype="<i4")
        if t.shape != lab.shape or t.ndim != 1:
            raise ValueError(f"tokens {t.shape} and labels {lab.shape} must be 1-D of equal length")
        offset = self.next_offset
        self._f.write(t.tobytes())
        self._f.write(lab.tobytes())
        return offset

    def sync(self) -> None:
        """Makes everything appended so far durable; call before writing the records that point at it."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.sync()
            finally:  # a failed sync (disk full) must not leak the file descriptor
                self._f.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_end_bytes(offset: int, length: int) -> int:
    """Byte size of a shard whose last item starts at element ``offset`` and has ``length`` tokens."""
    return SHARD_HEADER_BYTES + 4 * (offset + 2 * length)


def check_shard_header(header: bytes, path: os.PathLike) -> None:
    if len(header) < SHARD_HEADER_BYTES:
        raise RecordFormatError(f"{path}: shard is shorter than its {SHARD_HEADER_BYTES}-byte header")
    magic, version, _ = struct.unpack("<8sII", header[:SHARD_HEADER_BYTES])
    if magic != SHARD_MAGIC:
        raise RecordFormatError(f"{path}: not a token shard (magic {magic!r}, expected {SHARD_MAGIC!r})")
    if version != SHARD_VERSION:
        raise RecordFormatError(f"{path}: shard format version {version}, this code reads {SHARD_VERSION}")


class ShardReader:
    """Memory-mapped read access to one token shard."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            check_shard_header(f.read(SHARD_HEADER_BYTES), self.path)
        size = self.path.stat().st_size
        self.num_elements = (size - SHARD_HEADER_BYTES) // 4
        self._arr = (np.memmap(self.path, dtype="<i4", mode="r", offset=SHARD_HEADER_BYTES,
                               shape=(self.num_elements,)) if self.num_elements else np.zeros(0, "<i4"))

    def read(self, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (tokens, labels) as int64 arrays (copies, safe to keep after the reader closes)."""
        end = offset + 2 * length
        if offset < 0 or end > self.num_elements:
            raise RecordFormatError(f"{self.path}: item at offset {offset} with len {length} ends at "
                                    f"element {end}, but the shard holds {self.num_elements}")
        chunk = np.asarray(self._arr[offset:end], dtype=np.int64)
        return chunk[:length], chunk[length:]


# ----------------------------------------------------------------------------------- record files


def iter_record_file(path: str | os.PathLike) -> Iterator[Record]:
    """Yields the records of a ``*.jsonl`` (one per line) or a ``*.json`` array."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        d = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecordFormatError(f"{path}:{lineno}: not a JSON record line ({e})") from e
                    yield Record.from_dict(d, f"{path}:{lineno}")
    else:
        with open(path, encoding="utf-8") as f:
            try:
                arr = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordFormatError(f"{path}: not a JSON array of records ({e})") from e
        if not isinstance(arr, list):
            raise RecordFormatError(f"{path}: expected a JSON array of records, got {type(arr).__name__}")
        for i, d in enumerate(arr):
            yield Record.from_dict(d, f"{path}[{i}]")


def index_dir_for(record_path: str | os.PathLike) -> Path:
    return Path(str(record_path) + ".index")


def build_index(record_path: str | os.PathLike, records: Iterable[Record] | None = None) -> Path:
    """Writes ``{record}.index/`` for a record file (atomically: a temp dir renamed at the end)."""
    record_path = Path(record_path)
    if records is None:
        records = iter_record_file(record_path)
    files: dict[str, int] = {}
    ids, file_idx, offsets, lens = [], [], [], []
    for r in records:
        ids.append(r.id)
        file_idx.append(files.setdefault(r.file, len(files)))
        offsets.append(-1 if r.offset is None else r.offset)
        lens.append(r.len)
    st = record_path.stat()
    names_in_meta = len(files) <= MAX_NAMES_IN_META
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "count": len(ids),
            "files": list(files) if names_in_meta else None, "n_files": len(files),
            "record_size": st.st_size, "record_mtime_ns": st.st_mtime_ns}
    out = index_dir_for(record_path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    if not names_in_meta:
        encoded = [name.encode("utf-8") for name in files]
        width = max(len(b) for b in encoded)
        np.save(tmp / "files.npy", np.array(encoded, dtype=f"S{width}"), allow_pickle=False)
        del encoded
    for name, values, dtype in (("id", ids, np.int64), ("file", file_idx, np.int32),
                                ("offset", offsets, np.int64), ("len", lens, np.int32)):
        np.save(tmp / f"{name}.npy", np.asarray(values, dtype=dtype), allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps(meta))
    # Swap in the new directory; a concurrent builder of the same index (another rank) may win the race,
    # which is fine: it wrote the same content.
    old = out.with_name(out.name + f".old{os.getpid()}")
    try:
        os.replace(out, old)
    except FileNotFoundError:
        pass
    try:
        os.replace(tmp, out)
    except OSError:
        if not index_is_current(record_path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out


class FileNames(Sequence[str]):
    """The file names of an index, as stored: the list in meta.json, or a memory-mapped files.npy
    (opened lazily, and not carried along when pickled to a DataLoader worker)."""

    def __init__(self, index_dir: Path, meta: dict):
        self._names: list[str] | None = meta["files"]
        self._npy = Path(index_dir) / "files.npy"
        self._n = len(self._names) if self._names is not None else int(meta["n_files"])
        self._arr: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self._n))]
        if self._names is not None:
            return self._names[k]
        if self._arr is None:
            self._arr = np.load(self._npy, mmap_mode="r", allow_pickle=False)
        return bytes(self._arr[k]).decode("utf-8")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}


@dataclass
class RecordIndex:
    """The columns of a record index, memory-mapped. ``file_names`` are as stored (relative to the
    record file's directory unless absolute); ``file_path(k)`` resolves one. Paths are resolved lazily
    because Lumina records name one .pkl per item: making 10M Path objects at open takes minutes."""

    record_path: Path
    file_names: FileNames
    id: np.ndarray
    file: np.ndarray
    offset: np.ndarray
    len: np.ndarray

    def __len__(self) -> int:
        return int(self.id.shape[0])

    def file_path(self, k: int) -> Path:
        p = Path(self.file_names[k])
        return p if p.is_absolute() else self.record_path.parent / p

    def record(self, i: int) -> Record:
        off = int(self.offset[i])
        return Record(id=int(self.id[i]), file=str(self.file_path(int(self.file[i]))), len=int(self.len[i]),
                      offset=None if off < 0 else off)


def index_is_current(record_path: str | os.PathLike) -> bool:
    meta_path = index_dir_for(record_path) / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    st = Path(record_path).stat()
    return (meta.get("format") == INDEX_FORMAT and meta.get("version") == INDEX_VERSION
            and meta.get("record_size") == st.st_size and meta.get("record_mtime_ns") == st.st_mtime_ns)


def ensure_index(record_path: str | os.PathLike, build_if_missing: bool = True) -> tuple[Path, dict]:
    """(index dir, meta) of a record file, building the index first if it is missing or stale."""
    record_path = Path(record_path)
    if not record_path.is_file():
        raise FileNotFoundError(f"record file {record_path} does not exist; make one with "
                                f"pre_tokenize/pre_tokenize.py and pre_tokenize/concat_record.py")
    if not index_is_current(record_path):
        if not build_if_missing:
            raise RecordFormatError(f"{record_path}: index {index_dir_for(record_path)} is missing or "
                                    f"older than the record file; run pre_tokenize/concat_record.py")
        logger.info("building the index of %s (done once; concat_record.py writes it ahead)", record_path)
        build_index(record_path)
    d = index_dir_for(record_path)
    return d, json.loads((d / "meta.json").read_text())


def open_index(record_path: str | os.PathLike, build_if_missing: bool = True) -> RecordIndex:
    """Opens (building first if missing or stale) the index of a record file, memory-mapped."""
    d, meta = ensure_index(record_path, build_if_missing)
    cols = {name: np.load(d / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in ("id", "file", "offset", "len")}
    return RecordIndex(record_path=Path(record_path), file_names=FileNames(d, meta), **cols)

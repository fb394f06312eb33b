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

import contextlib
import fcntl
import itertools
import json
import logging
import operator
import os
import shutil
import struct
import uuid
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
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordFormatError(f"{where}: bad record {d!r}: needs integer 'id' and 'len' and a "
                                    f"string 'file' ({e})") from e


def shard_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-tokens.bin"


def record_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-record.jsonl"


def errors_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-errors.jsonl"


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


JSON_CHUNK_BYTES = 4 << 20  # record.json is parsed this many characters at a time (~50k records)
MAX_ELEMENT_BYTES = 1 << 20  # an element that does not parse within this much text is malformed
INDEX_CHUNK = 100_000  # records per chunk of the index columns
MAX_NAMES_IN_DICT = 1 << 16  # distinct file names deduplicated by a dict; beyond, by 64-bit hashes (see _FileColumn)


def iter_json_array(path: str | os.PathLike, chunk_bytes: int | None = None) -> Iterator[list]:
    """Yields the elements of the JSON array in ``path``, a list per ``chunk_bytes`` (default
    JSON_CHUNK_BYTES) of text or so.

    Memory is bounded by the chunk, not the file (a 10M-record record.json is ~1 GB of text and ~4 GB of
    Python objects once loaded). Each chunk is cut after its last ``}`` and parsed by json's C decoder as
    ``"[" + chunk + "]"``; a cut that falls inside a string or a nested value cannot parse (the text would
    end inside it), and then the chunk is walked element by element with ``JSONDecoder.raw_decode``,
    which also gives malformed text a message naming the character offset.
    """
    path = Path(path)
    chunk_bytes = chunk_bytes or JSON_CHUNK_BYTES
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_bytes)
        consumed = 0  # characters before ``buf`` (for messages)
        body = buf.lstrip()
        if not body.startswith("["):
            raise RecordFormatError(f"{path}: expected a JSON array of records, but the file does not start "
                                    f"with '[' (got {body[:40]!r})")
        consumed += len(buf) - len(body) + 1
        buf = body[1:]
        eof, need_sep = False, False  # need_sep: a ',' or the closing ']' comes next
        while True:
            if not eof and len(buf) < chunk_bytes:
                more = f.read(chunk_bytes)
                eof = not more
                buf += more
            body = buf.lstrip()
            consumed += len(buf) - len(body)
            if not body and eof:
                raise RecordFormatError(f"{path}: the JSON array ends early, without its closing ']' "
                                        f"(truncated file?), after character {consumed}")
            if need_sep and body.startswith(","):  # the separator after the previous chunk's last element
                stripped = body[1:].lstrip()
                consumed += len(body) - len(stripped)
                body, need_sep = stripped, False
            elif need_sep and not body.startswith("]"):
                raise RecordFormatError(f"{path}: near character {consumed}: expected ',' or ']' after a record, "
                                        f"got {body[:40]!r}")
            if body.startswith("]"):
                if body[1:].strip() or f.read(chunk_bytes).strip():
                    raise RecordFormatError(f"{path}: text after the closing ']' of the record array")
                return
            items, rest = _parse_prefix(body, dec, eof, path, consumed)
            if items is None:  # the element continues beyond the buffer: read more
                more = f.read(max(chunk_bytes, len(body)))
                eof = not more
                buf = body + more
                continue
            consumed += len(body) - len(rest)
            need_sep = True
            yield items
            buf = rest


def _parse_prefix(body: str, dec: json.JSONDecoder, eof: bool, path: Path, at: int):
    """(elements, rest): the whole elements at the start of ``body`` (which starts at an element) and the
    text after them; (None, body) when the first element is not complete in ``body``. Raises
    RecordFormatError for text that is not JSON."""
    cut = body.rfind("}") + 1
    if cut > 0:
        try:
            return json.loads("[" + body[:cut] + "]"), body[cut:]
        except json.JSONDecodeError:
            pass
    # slow path: a cut inside a string or a nested value, elements that are not objects, or bad JSON
    items, i, j, n = [], 0, 0, len(body)
    while True:
        try:
            obj, j_next = dec.raw_decode(body, i)
        except json.JSONDecodeError as e:
            if items:
                return items, body[j:]  # what parsed; then the separator and this element again, with more text
            if not eof and n - i < MAX_ELEMENT_BYTES:
                return None, body
            raise RecordFormatError(f"{path}: not a JSON array of records: {e.msg} near character "
                                    f"{at + e.pos} ({body[max(e.pos - 40, 0):e.pos + 40]!r})") from None
        items.append(obj)
        k = j = j_next
        while k < n and body[k] in " \t\r\n":
            k += 1
        if k + 1 < n and body[k] == ",":
            i = k + 1
            while i < n and body[i] in " \t\r\n":
                i += 1
            if i < n:
                continue
        return items, body[j:]  # "," at the end of the buffer, "]", or junk (checked by the caller)


def iter_record_file(path: str | os.PathLike) -> Iterator[Record]:
    """Yields the records of a ``*.jsonl`` (one per line) or a ``*.json`` array (streamed in chunks)."""
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
        i = 0
        for items in iter_json_array(path):
            for d in items:
                yield Record.from_dict(d, f"{path}[{i}]")
                i += 1


def _record_chunks(record_path: Path, records: Iterable[Record] | None) -> Iterator[tuple]:
    """(ids, names, offsets, lens) per chunk of records, from ``records`` or parsed from the file."""
    if records is None and record_path.suffix != ".jsonl":
        i = 0
        for items in iter_json_array(record_path):
            try:  # fast path (C-level loops): numpy infers an integer dtype only from plain ints (and bools,
                # which int() takes alike); anything else gets the exact per-record checks and messages
                ids, lens, names = (list(map(get, items)) for get in _GETTERS)
                ids, lens = np.array(ids), np.array(lens)
                try:
                    offs = np.array(list(map(_GET_OFFSET, items)))
                except KeyError:  # Lumina's records have no offset at all (mixed: the exact checks)
                    if any(map(operator.contains, items, itertools.repeat("offset"))):
                        raise TypeError("some records have an offset, some not") from None
                    offs = np.full(len(items), -1, dtype=np.int64)
                if (not all(c.dtype.kind == "i" and c.ndim == 1 for c in (ids, lens, offs))
                        or set(map(type, names)) != {str} or not -2**31 <= lens.min() <= lens.max() < 2**31):
                    raise TypeError("not all plain integers and strings")
                cols = (ids.astype(np.int64), names, offs.astype(np.int64), lens.astype(np.int32))
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # exact checks and messages
                cols = _columns([Record.from_dict(d, f"{record_path}[{i + k}]") for k, d in enumerate(items)])
            i += len(items)
            yield cols
        return
    it = iter(records if records is not None else iter_record_file(record_path))
    while True:
        chunk = [r for _, r in zip(range(INDEX_CHUNK), it)]
        if not chunk:
            return
        yield _columns(chunk)


_GETTERS = (operator.itemgetter("id"), operator.itemgetter("len"), operator.itemgetter("file"))
_GET_OFFSET = operator.itemgetter("offset")


def _columns(recs: list[Record]) -> tuple:
    return (np.array([r.id for r in recs], dtype=np.int64), [r.file for r in recs],
            np.array([-1 if r.offset is None else r.offset for r in recs], dtype=np.int64),
            np.array([r.len for r in recs], dtype=np.int32))


class _NpyColumn:
    """A 1-D ``.npy`` file written in chunks: the header (numpy leaves room for the shape to grow) is
    rewritten with the final length at the end."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self._f = open(path, "wb")
        self._header = self._header_bytes(0)
        self._f.write(self._header)

    def _header_bytes(self, n: int) -> bytes:
        import io

        b = io.BytesIO()
        np.lib.format.write_array_header_1_0(b, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                 "fortran_order": False, "shape": (n,)})
        return b.getvalue()

    def append(self, values: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.n += len(values)

    def close(self) -> None:
        header = self._header_bytes(self.n)
        if len(header) != len(self._header):  # numpy pads the header for 21-digit shapes: cannot happen
            raise RecordFormatError(f"{self.path}: npy header grew from {len(self._header)} to {len(header)} bytes")
        self._f.seek(0)
        self._f.write(header)
        self._f.close()


class _FileColumn:
    """Numbers the file names in order of first appearance, exactly as a dict would, in bounded memory.

    Few distinct names (token shards): a dict. Many (Lumina's one .pkl per item, 10M names): the dict would
    take ~1.5 GB, so past MAX_NAMES_IN_DICT names, or once more than MAX_NAMES_IN_META names are all
    distinct, the names go to a scratch file with their 64-bit hashes and are
    numbered at the end: all hashes distinct (the usual case, sorted in place) means all names distinct;
    otherwise np.unique groups equal hashes and each grouped name is compared with its group's first, so
    a hash collision can never merge two names (it is numbered with the exact dict instead). The hashes are
    Python's own ``hash(str)``, used only inside one build. Memory at the end: ~9 bytes per record in the
    usual case; ~40 bytes per record when many names repeat (np.unique's index arrays).
    """

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.names: dict[str, int] | None = {}
        self.idx: list[np.ndarray] = []  # dict mode: int32 per chunk
        self.n = 0
        self._bytes = self._lens = self._hashes = None

    def add(self, names: list[str]) -> None:
        if self.names is not None:
            d = self.names
            for n in dict.fromkeys(names):  # the chunk's distinct names, in order of first appearance
                d.setdefault(n, len(d))
            self.idx.append(np.fromiter(map(d.__getitem__, names), dtype=np.int32, count=len(names)))
            self.n += len(names)
            # many names, or every name new so far (Lumina's one .pkl per item): hashes from here on
            if len(d) > MAX_NAMES_IN_DICT or MAX_NAMES_IN_META < len(d) == self.n:
                self._spill()
            return
        self._write(names)

    def _write(self, names: list[str]) -> None:
        joined = "".join(names).encode("utf-8")
        lens = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
        if len(joined) != int(lens.sum()):  # multi-byte characters: byte lengths one by one
            enc = [n.encode("utf-8") for n in names]
            lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
        self._bytes.write(joined)
        self._lens.append(lens)
        self._hashes.append(np.fromiter(map(hash, names), dtype=np.int64, count=len(names)))
        self.n += len(names)

    def _spill(self) -> None:
        """Leaves dict mode: the names of every record so far go to the scratch files."""
        self.scratch.mkdir(exist_ok=True)
        self._bytes = open(self.scratch / "names.bin", "wb")
        self._lens = _NpyColumn(self.scratch / "lens.npy", np.int64)
        self._hashes = _NpyColumn(self.scratch / "hashes.npy", np.int64)
        by_idx = list(self.names)
        self.names, idx, self.n = None, self.idx, 0
        self.idx = []
        for part in idx:
            self._write([by_idx[k] for k in part])

    def finish(self, out_dir: Path) -> tuple[np.ndarray | None, list[str] | None, int]:
        """(file index per record, or None when written as file.npy; names if few; number of names).
        Writes files.npy when the names are many."""
        if self.names is not None:
            idx = np.concatenate(self.idx) if self.idx else np.zeros(0, np.int32)
            return idx, list(self.names), len(self.names)
        self._bytes.close()
        self._lens.close()
        self._hashes.close()
        n = self.n
        lens = np.load(self.scratch / "lens.npy", mmap_mode="r")
        hashes = np.load(self.scratch / "hashes.npy")  # a private copy: sorted in place
        hashes.sort()
        distinct = n == 0 or bool((hashes[1:] != hashes[:-1]).all())
        del hashes
        if distinct:
            first = None  # record k names file k
            col = _NpyColumn(out_dir / "file.npy", np.int32)
            for lo in range(0, n, INDEX_CHUNK):
                col.append(np.arange(lo, min(n, lo + INDEX_CHUNK), dtype=np.int32))
            col.close()
        else:
            first, idx = self._number_with_duplicates(lens)
            if idx is None:  # two different names share a 64-bit hash (never seen): number them with a dict
                names: dict[str, int] = {}
                idx = np.array([names.setdefault(s, len(names)) for s in self._iter_names(lens)], dtype=np.int32)
                return idx, list(names), len(names)
            np.save(out_dir / "file.npy", idx, allow_pickle=False)
        self._write_files_npy(out_dir, lens, first)
        return None, None, n if first is None else len(first)

    def _iter_names(self, lens) -> Iterator[str]:
        with open(self.scratch / "names.bin", "rb") as f:
            for ln in lens:
                yield f.read(int(ln)).decode("utf-8")

    def _number_with_duplicates(self, lens):
        hashes = np.load(self.scratch / "hashes.npy", mmap_mode="r")
        _, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(first), dtype=np.int32)
        rank[order] = np.arange(len(first), dtype=np.int32)
        idx = rank[inv.reshape(-1)]
        first = first[order]
        # every record of a group must carry its group's first name (else two names share a hash)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else np.zeros(0, np.int64)
        data = np.memmap(self.scratch / "names.bin", dtype=np.uint8, mode="r") if starts.size and lens.sum() else None
        dup = np.flatnonzero(first[idx] != np.arange(len(idx)))
        for k in dup:
            a, b = int(first[idx[k]]), int(k)
            if lens[a] != lens[b] or (data is not None and
                                      not np.array_equal(data[starts[a]:starts[a] + lens[a]],
                                                         data[starts[b]:starts[b] + lens[b]])):
                return None, None
        return first, idx

    def _write_files_npy(self, out_dir: Path, lens, first) -> None:
        """files.npy (fixed-width UTF-8, as np.array(names, dtype=S{width}) writes it) from the scratch names:
        every record's name, or those at ``first``; vectorised, INDEX_CHUNK names at a time."""
        lens = np.asarray(lens)
        keep = None
        if first is not None:
            keep = np.zeros(len(lens), dtype=bool)
            keep[first] = True
        width = max(int(lens.max() if keep is None else lens[keep].max()), 1)
        col = _NpyColumn(out_dir / "files.npy", f"S{width}")
        step = 1 << 14  # names per block: the index arrays below are 8 bytes per name byte
        with open(self.scratch / "names.bin", "rb") as f:
            for lo in range(0, len(lens), step):
                ln = lens[lo:lo + step]
                data = np.frombuffer(f.read(int(ln.sum())), dtype=np.uint8)
                rows = np.zeros((len(ln), width), dtype=np.uint8)  # NUL padding, as numpy's S dtype pads
                # byte b of name r goes to r * width + (b - start of r)
                shift = np.arange(len(ln), dtype=np.int64) * width - (np.cumsum(ln) - ln)
                rows.reshape(-1)[np.arange(len(data), dtype=np.int64) + np.repeat(shift, ln)] = data
                if keep is not None:
                    rows = rows[keep[lo:lo + step]]
                col.append(rows.view(f"S{width}").reshape(-1))
        col.close()


def index_dir_for(record_path: str | os.PathLike) -> Path:
    return Path(str(record_path) + ".index")


def build_index(record_path: str | os.PathLike, records: Iterable[Record] | None = None) -> Path:
    """Writes ``{record}.index/`` for a record file (atomically: a temp dir renamed at the end).

    Streamed: the record file (or ``records``) is read in chunks and each column is appended to its
    ``.npy`` as it comes, so memory stays bounded (a chunk of parsed records, plus the file-name
    numbering of _FileColumn) however many records there are. The result is byte-identical to numbering the
    names with a dict over the whole list. If another process installs a current index first, this one
    keeps it and discards its own; ``ensure_index`` takes a lock so that normally only one process builds.
    """
    record_path = Path(record_path)
    st = record_path.stat()
    out = index_dir_for(record_path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        cols = {name: _NpyColumn(tmp / f"{name}.npy", dtype)
                for name, dtype in (("id", np.int64), ("offset", np.int64), ("len", np.int32))}
        names = _FileColumn(tmp / "scratch")
        for ids, files, offsets, lens in _record_chunks(record_path, records):
            cols["id"].append(ids)
            cols["offset"].append(offsets)
            cols["len"].append(lens)
            names.add(files)
        count = cols["id"].n
        for c in cols.values():
            c.close()
        file_idx, file_list, n_files = names.finish(tmp)
        if file_idx is not None:
            np.save(tmp / "file.npy", file_idx, allow_pickle=False)
        names_in_meta = n_files <= MAX_NAMES_IN_META
        if file_list is not None and not names_in_meta:
            encoded = [name.encode("utf-8") for name in file_list]
            np.save(tmp / "files.npy", np.array(encoded, dtype=f"S{max(len(b) for b in encoded)}"),
                    allow_pickle=False)
            del encoded
        elif file_list is None and names_in_meta:  # spilled, yet few enough for meta.json (a small dict limit)
            file_list = [bytes(b).decode("utf-8") for b in np.load(tmp / "files.npy", allow_pickle=False)]
            (tmp / "files.npy").unlink()
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "count": count,
                "files": file_list if names_in_meta else None, "n_files": n_files,
                "record_size": st.st_size, "record_mtime_ns": st.st_mtime_ns}
        (tmp / "meta.json").write_text(json.dumps(meta))
        _install(tmp, out, record_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _install(tmp: Path, out: Path, record_path: Path) -> None:
    """Renames the finished ``tmp`` to ``out`` without removing a current index that a reader may have
    open: a current one (another builder won) is kept, a stale one is moved aside first."""
    for _ in range(3):
        if index_is_current(record_path):
            return
        try:
            os.rename(tmp, out)  # atomic; fails if ``out`` exists (a directory is never replaced by rename)
            return
        except FileNotFoundError:
            raise
        except OSError:
            if index_is_current(record_path):
                return
            old = out.with_name(out.name + f".old{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(out, old)  # the stale index out of the way
            except FileNotFoundError:
                pass
            shutil.rmtree(old, ignore_errors=True)
    raise RecordFormatError(f"{out}: cannot install the new index (another process keeps replacing it)")


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


@contextlib.contextmanager
def _build_lock(record_path: Path):
    """An exclusive lock (flock on ``{record}.index.lock``, left in place) around building an index, so the
    ranks of a machine, and of machines sharing a file system that supports locks, build it once while the
    others wait. Where locks are not supported, everyone builds; ``build_index`` installs atomically."""
    lock_path = Path(str(record_path) + ".index.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as e:
        logger.warning("%s: cannot create the lock file (%s); building without it", lock_path, e)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish the index of %s", record_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on a file system without locks
            logger.warning("%s: file locks are not supported here (%s); building without one", lock_path, e)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_index(record_path: str | os.PathLike, build_if_missing: bool = True) -> tuple[Path, dict]:
    """(index dir, meta) of a record file, building the index first if it is missing or stale (under a file
    lock: a process that finds another one building waits for it and then uses its index)."""
    record_path = Path(record_path)
    if not record_path.is_file():
        raise FileNotFoundError(f"record file {record_path} does not exist; make one with "
                                f"pre_tokenize/pre_tokenize.py and pre_tokenize/concat_record.py")
    if not index_is_current(record_path):
        if not build_if_missing:
            raise RecordFormatError(f"{record_path}: index {index_dir_for(record_path)} is missing or "
                                    f"older than the record file; run pre_tokenize/concat_record.py")
        with _build_lock(record_path):
            if index_is_current(record_path):
                logger.info("the index of %s was built by another process", record_path)
            else:
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

"""Data as the Hugging Face ``datasets`` library keeps it, read with pyarrow alone (the ``hf`` extra).

    src = open_input("LLaVA-OneVision-Data/data", "parquet")      # Hub parquet shards, split "train"
    src = open_input("my_set", "hf", hf_split="validation")       # a DatasetDict.save_to_disk folder
    for it in src.iter_items(range(0, len(src))): ...              # InputItem per row, ids stable

``--in_format parquet``: one ``.parquet`` file, a glob of them, or a directory holding them at any depth (the
Hub layout ``data/train-00000-of-00002.parquet``, or ``default/train/0000.parquet``), files in sorted path
order. In a directory, the files of ``--hf_split`` are those named ``{split}-NNNNN-of-NNNNN.parquet`` /
``{split}.parquet`` (or ``...-{split}...``) or lying under a folder named after it; a directory with no
split names is read whole. Read a row group at a time, in batches of ``ROWS_PER_BATCH`` rows, only the
columns needed, through a buffered stream (``pre_buffer`` off): memory does not grow with the shard.

``--in_format hf``: a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``) or
``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such folder per split; ``--hf_split`` picks it).
The Arrow files (IPC streams) are memory-mapped and read zero-copy, a record batch at a time; the pages
of batches already read are handed back to the kernel (``MADV_DONTNEED``), so resident memory stays at
about one batch, not the file. The ``datasets`` package is not needed.

Columns (``--field_map`` renames any of them, e.g. ``conversations=dialog,image=jpg``):

- the conversation: ``conversations`` (messages with ``from``/``value``, LLaVA/Lumina roles) or ``messages``
  (``role``/``content``, roles ``user``/``assistant``). A ``content`` may also be a list of parts
  (``{"type": "text", "text": ...}``, ``{"type": "image"}``, ``{"type": "video"}``), as in HF chat
  templates: the parts are joined, an image part becomes ``<|image|>``. A first ``system`` turn is refused
  with a clear message: Lumina-mGPT's sequences have no system prompt (the item processor refuses any
  turn before the first human one). A JSON string holding the list is accepted too.
- images: ``image`` (one) or ``images`` (a list); each a ``datasets`` Image struct ``{bytes, path}`` (the
  bytes when present, else the path), raw binary (the encoded file), or a path string; paths resolve
  against ``--image_root`` (default: the input's directory). Markers ``<image>`` and ``<|image|>``.
- videos: ``video`` / ``videos`` the same way (bytes or paths), markers ``<video>`` / ``<|video|>``.

An item's id is its row's position over the files in order. A row whose conversation is missing or of the
wrong shape is an item error (``errors.jsonl``); image bytes that do not decode and marker mismatches are
rejected by the item processor like those of any format.
"""

from __future__ import annotations

import abc
import glob
import json
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.inputs.item import NESTED_TOO_DEEPLY, InputFileError, InputItem, llava_to_lumina

ROWS_PER_BATCH = 64        # rows converted to Python objects at a time (images: a few MB each at most)
READ_BUFFER = 1 << 20      # parquet: bytes read per I/O through the buffered stream
HF_STATE = "state.json"
HF_DICT = "dataset_dict.json"
# field_map keys: the columns, then the keys inside a message
COLUMN_FIELDS = ("conversations", "messages", "image", "images", "video", "videos")
MESSAGE_FIELDS = ("from", "value", "role", "content")
# names a directory of Hub shards uses for its splits (to tell "no file of this split" from "no splits")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise InputFileError("--in_format parquet and hf need pyarrow, which is not installed: "
                             "pip install -e .[hf] (or pip install pyarrow)") from e
    return pyarrow


def parse_field_map(spec: str | None) -> dict[str, str]:
    """``"conversations=dialog,image=jpg"`` -> {"conversations": "dialog", "image": "jpg"}; checks the keys."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, sep, col = (s.strip() for s in part.partition("="))
        if not sep or not key or not col:
            raise InputFileError(f"--field_map {spec!r}: expected FIELD=COLUMN[,FIELD=COLUMN...], got {part!r}")
        if key not in COLUMN_FIELDS + MESSAGE_FIELDS:
            raise InputFileError(f"--field_map {spec!r}: unknown field {key!r}; the fields are "
                                 f"{', '.join(COLUMN_FIELDS)} (columns) and {', '.join(MESSAGE_FIELDS)} "
                                 f"(keys inside a message)")
        if key in out:
            raise InputFileError(f"--field_map {spec!r}: {key!r} given twice")
        out[key] = col
    return out


@dataclass(frozen=True)
class Columns:
    """Which table columns hold the conversation and the media, and the message keys."""

    conversation: str
    style: str                      # "conversations" (from/value) or "messages" (role/content)
    image: str | None
    video: str | None
    role_keys: tuple[str, ...]      # message keys tried for the speaker, in order
    text_keys: tuple[str, ...]      # ... and for the text

    @property
    def needed(self) -> list[str]:
        return [c for c in (self.conversation, self.image, self.video) if c is not None]


def resolve_columns(names: list[str], fields: dict[str, str], where: str) -> Columns:
    """The columns to read, from the table's column ``names`` and ``--field_map``; refuses what is missing."""
    def pick(*keys: str) -> tuple[str | None, str | None]:
        for k in keys:
            if k in fields:
                if fields[k] not in names:
                    raise InputFileError(f"{where}: --field_map {k}={fields[k]}: no column {fields[k]!r} "
                                         f"(columns: {', '.join(names)})")
                return k, fields[k]
        for k in keys:
            if k in names:
                return k, k
        return None, None

    style, conv = pick("conversations", "messages")
    if conv is None:
        raise InputFileError(f"{where}: no conversation column: expected 'conversations' (from/value) or "
                             f"'messages' (role/content); columns: {', '.join(names)}. Name yours with "
                             f"--field_map conversations=COLUMN")
    _, image = pick("image", "images")
    _, video = pick("video", "videos")
    role_keys = (fields["from"],) if "from" in fields else (fields["role"],) if "role" in fields else ()
    text_keys = (fields["value"],) if "value" in fields else (fields["content"],) if "content" in fields else ()
    default_roles, default_texts = (("from", "role"), ("value", "content")) if style == "conversations" else \
        (("role", "from"), ("content", "value"))
    return Columns(conv, style, image, video, role_keys or default_roles, text_keys or default_texts)


# ------------------------------------------------------------------------------------------ rows -> items


def _media(value, column: str) -> tuple[list, str | None]:
    """The entries of an image/video cell: bytes or path strings for the item processor; or why not."""
    if value is None:
        return [], None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, v in enumerate(values):
        at = f"column {column!r}" + (f"[{k}]" if isinstance(value, (list, tuple)) else "")
        if isinstance(v, dict):  # the datasets Image / Video feature: {"bytes": ..., "path": ...}
            if v.get("bytes") is not None:
                v = v["bytes"]
            elif v.get("path") is not None:
                v = v["path"]
            else:
                return [], f"{at} has neither bytes nor a path (keys: {', '.join(sorted(v))})"
        if isinstance(v, (bytes, bytearray)):
            out.append(bytes(v))
        elif isinstance(v, str) and v:
            out.append(v)
        else:
            return [], (f"{at} is {'an empty path' if v == '' else 'null' if v is None else 'a ' + type(v).__name__}"
                        f"; expected encoded bytes, a path, or a datasets Image struct {{bytes, path}}")
    return out, None


def _content_text(content, k: int) -> tuple[str | None, str | None]:
    """A message's text: a string, or HF chat-template parts joined (image/video parts as markers)."""
    if isinstance(content, str) or content is None:
        return content, None
    if not isinstance(content, list):
        return None, f"message {k}: content is a {type(content).__name__}, not text or a list of parts"
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append("<|image|>")
        elif kind == "video":
            pieces.append("<|video|>")
        else:
            return None, f"message {k}: content part {j} is not a text, image or video part: {part!r:.80}"
    return "".join(pieces), None


def _first(m: dict, keys: tuple[str, ...]):
    for key in keys:
        if m.get(key) is not None:
            return m[key]
    return None


def row_to_item(row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    """A table row -> (Lumina item, None) or (None, why)."""
    conv = row.get(cols.conversation)
    if conv is None:
        return None, f"column {cols.conversation!r} is null (no conversation in this row)"
    if isinstance(conv, str):  # some sets keep the list as a JSON string
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError as e:
            return None, f"column {cols.conversation!r} is a string that is not JSON ({e})"
        except RecursionError:
            return None, f"column {cols.conversation!r}: {NESTED_TOO_DEEPLY}"
    if not isinstance(conv, list):
        return None, f"column {cols.conversation!r} is a {type(conv).__name__}, not a list of messages"
    messages = []
    for k, m in enumerate(conv):
        if not isinstance(m, dict):
            return None, f"column {cols.conversation!r}: message {k} is a {type(m).__name__}, not an object"
        role = _first(m, cols.role_keys)
        if isinstance(role, str) and role.lower() == "system":
            return None, (f"column {cols.conversation!r}: message {k} is a system turn; Lumina-mGPT's sequences "
                          f"have no system prompt (a conversation starts with a human turn): drop it, or fold "
                          f"its text into the first user message")
        text, err = _content_text(_first(m, cols.text_keys), k)
        if err:
            return None, f"column {cols.conversation!r}: {err}"
        messages.append({"from": role, "value": text})
    item: dict = {"conversations": messages}
    for kind, column in (("image", cols.image), ("video", cols.video)):
        if column is None:
            continue
        entries, err = _media(row.get(column), column)
        if err:
            return None, err
        if entries:
            item[kind] = entries
    return llava_to_lumina(item), None


# --------------------------------------------------------------------------------------------- sources


@dataclass
class _File:
    path: Path
    rows: int


class _TableSource(abc.ABC):
    """Rows of ``files`` in order, read in batches; subclasses say how a file's batches are read."""

    format = ""

    def __init__(self, path: Path, files: list[_File], cols: Columns):
        self.path, self.files, self.cols = path, files, cols
        # relative media paths resolve here (a glob: its directory part before the first pattern)
        root = next((Path(*path.parts[:k]) for k, part in enumerate(path.parts) if _GLOB_CHARS.search(part)), None)
        self.base_dir = path if path.is_dir() else root if root is not None and not path.exists() else path.parent
        self._names = [f.path.relative_to(path).as_posix() if path.is_dir() else f.path.name for f in files]

    def __len__(self) -> int:
        return sum(f.rows for f in self.files)

    @abc.abstractmethod
    def _batches(self, f: _File, start: int) -> Iterator:
        """Record batches of file ``f`` from its row ``start`` on (the first batch may begin before it)."""

    def iter_items(self, ids: range) -> Iterator[InputItem]:
        first = 0
        for f, name in zip(self.files, self._names):
            if first >= ids.stop:
                return
            if first + f.rows > ids.start:
                i = max(ids.start, first)
                for batch in self._batches(f, i - first):
                    for lo in range(0, batch.num_rows, ROWS_PER_BATCH):
                        for row in batch.slice(lo, ROWS_PER_BATCH).to_pylist():
                            if i >= ids.stop:
                                return
                            yield self._item(i, name, i - first, row)
                            i += 1
                if i < min(ids.stop, first + f.rows):
                    raise InputFileError(f"--in_filename {self.path}: {f.path.name} has {i - first} rows, "
                                         f"{f.rows} when opened: the file changed while being read")
            first += f.rows

    def _item(self, i: int, name: str, row_no: int, row: dict) -> InputItem:
        where = f"{name} row {row_no}"
        item, err = row_to_item(row, self.cols)
        return InputItem(i, where, item) if err is None else InputItem(i, where, error=f"{where}: {err}")


def _split_of(rel: Path, split: str) -> bool:
    if split in rel.parts[:-1]:
        return True
    return re.search(rf"(^|[-_]){re.escape(split)}([-_.]|$)", rel.name[:-len(".parquet")] + ".") is not None


def parquet_files(path: Path, split: str) -> list[Path]:
    """The parquet files of ``--in_filename`` (see the module docstring), in order."""
    s = str(path)
    if not path.exists() and _GLOB_CHARS.search(s):
        files = sorted(Path(p) for p in glob.glob(s, recursive=True) if p.endswith(".parquet"))
        if not files:
            raise InputFileError(f"--in_filename {s}: the pattern matches no .parquet file")
        return files
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputFileError(f"--in_filename {path}: not found")
    files = sorted((p for p in path.rglob("*.parquet") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise InputFileError(f"--in_filename {path}: no .parquet files in this directory")
    rel = [p.relative_to(path) for p in files]
    mine = [p for p, r in zip(files, rel) if _split_of(r, split)]
    if mine:
        return mine
    seen = sorted({s for s in KNOWN_SPLITS for r in rel if _split_of(r, s)})
    if seen:
        raise InputFileError(f"--hf_split {split!r}: no parquet file of this split in {path} (splits there: "
                             f"{', '.join(seen)}); pass --hf_split NAME")
    return files


class ParquetSource(_TableSource):
    """Parquet files read a row group at a time, in ROWS_PER_BATCH-row batches, needed columns only."""

    format = "parquet"

    def __init__(self, path: Path, split: str = "train", fields: dict[str, str] | None = None):
        pa = _pyarrow()
        files, cols = [], None
        for p in parquet_files(path, split):
            try:
                pf = pa.parquet.ParquetFile(p)
            except (OSError, pa.ArrowException) as e:
                raise InputFileError(f"--in_filename {path}: {p.name} is not a readable parquet file ({e})") from e
            with pf:
                names = pf.schema_arrow.names
                c = resolve_columns(names, fields or {}, f"--in_filename {path}: {p.name}")
                if cols is not None and c != cols:
                    raise InputFileError(f"--in_filename {path}: {p.name} has other columns than "
                                         f"{files[0].path.name} ({', '.join(names)})")
                cols = c
                files.append(_File(p, pf.metadata.num_rows))
        super().__init__(path, files, cols)

    def _batches(self, f: _File, start: int) -> Iterator:
        pa = _pyarrow()
        try:
            pf = pa.parquet.ParquetFile(f.path, buffer_size=READ_BUFFER, pre_buffer=False)
        except (OSError, pa.ArrowException) as e:
            raise InputFileError(f"--in_filename {self.path}: {f.path.name} is not readable ({e})") from e
        with pf:
            md = pf.metadata
            g, first = 0, 0
            while g < md.num_row_groups and first + md.row_group(g).num_rows <= start:
                first += md.row_group(g).num_rows
                g += 1
            skip = start - first  # rows of the first row group before `start`: read and dropped
            try:
                for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=range(g, md.num_row_groups),
                                             columns=self.cols.needed, use_threads=False):
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    yield batch.slice(skip) if skip else batch
                    skip = 0
            except (OSError, pa.ArrowException) as e:
                raise InputFileError(f"--in_filename {self.path}: {f.path.name} is damaged ({e})") from e


class _MappedStream:
    """An Arrow IPC stream file (what save_to_disk writes), memory-mapped; ``release()`` drops the pages of
    the batches read so far from this process's resident memory (they are re-read from the file if needed)."""

    def __init__(self, path: Path):
        pa = _pyarrow()
        self._f = open(path, "rb")
        try:
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            self._f.close()
            raise InputFileError(f"{path.name} is empty (0 bytes), not an Arrow file") from None
        self._buf = pa.BufferReader(pa.py_buffer(self._mm))
        try:
            self.reader = pa.ipc.open_stream(self._buf)
        except pa.ArrowException as e:
            self.close()
            raise InputFileError(f"{path.name} is not an Arrow stream as save_to_disk writes ({e})") from e

    def release(self) -> None:
        upto = self._buf.tell() // mmap.PAGESIZE * mmap.PAGESIZE
        if upto and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, 0, upto)

    def close(self) -> None:
        self.reader = self._buf = None
        try:
            self._mm.close()
        except BufferError:  # a batch still refers to the map; it is unmapped when that is collected
            pass
        self._f.close()

    def __enter__(self) -> "_MappedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hf_arrow_files(path: Path, split: str) -> list[Path]:
    """The Arrow files of a save_to_disk folder (the split's, for a DatasetDict), in state.json's order."""
    if not path.is_dir():
        raise InputFileError(f"--in_filename {path}: not a directory (--in_format hf reads a folder written "
                             f"by Dataset.save_to_disk or DatasetDict.save_to_disk)")
    if (path / HF_DICT).is_file():
        try:
            splits = json.loads((path / HF_DICT).read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise InputFileError(f"--in_filename {path}: {HF_DICT} is not a DatasetDict description ({e})") from e
        if split not in splits:
            raise InputFileError(f"--hf_split {split!r}: not a split of {path} (splits: {', '.join(splits)})")
        path = path / split
    state_path = path / HF_STATE
    if not state_path.is_file():
        raise InputFileError(f"--in_filename {path}: no {HF_STATE} or {HF_DICT}: not a folder written by "
                             f"save_to_disk (for parquet files use --in_format parquet)")
    try:
        state = json.loads(state_path.read_text())
        names = [d["filename"] for d in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputFileError(f"--in_filename {state_path}: not a datasets state.json ({type(e).__name__}: {e})") from e
    if state.get("_indices_data_files"):
        raise InputFileError(f"--in_filename {state_path}: the dataset keeps an indices mapping (saved by an "
                             f"old datasets version); save it again with a current one (save_to_disk "
                             f"flattens it)")
    files = [path / n for n in names]
    missing = [n for n, f in zip(names, files) if not f.is_file()]
    if missing:
        raise InputFileError(f"--in_filename {path}: {HF_STATE} lists {', '.join(missing)}, which is missing")
    return files


class HfDiskSource(_TableSource):
    """A save_to_disk folder: its Arrow stream files memory-mapped, a record batch at a time."""

    format = "hf"

    def __init__(self, path: Path, split: str = "train", fields: dict[str, str] | None = None):
        _pyarrow()
        files, cols = [], None
        for p in hf_arrow_files(path, split):
            try:
                with _MappedStream(p) as s:
                    names = s.reader.schema.names
                    rows = sum(b.num_rows for b in s.reader)  # zero-copy: only message headers are touched
            except InputFileError as e:
                raise InputFileError(f"--in_filename {path}: {e}") from e
            except (OSError, _pyarrow().ArrowException) as e:
                raise InputFileError(f"--in_filename {path}: {p.name} is damaged ({e})") from e
            c = resolve_columns(names, fields or {}, f"--in_filename {path}: {p.name}")
            if cols is not None and c != cols:
                raise InputFileError(f"--in_filename {path}: {p.name} has other columns than {files[0].path.name}")
            cols = c
            files.append(_File(p, rows))
        super().__init__(path, files, cols)

    def _batches(self, f: _File, start: int) -> Iterator:
        pa = _pyarrow()
        try:
            s = _MappedStream(f.path)
        except InputFileError as e:
            raise InputFileError(f"--in_filename {self.path}: {e}") from e
        with s:
            skip = start
            try:
                for batch in s.reader:
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                    else:
                        yield batch.select(self.cols.needed).slice(skip)
                        skip = 0
                    del batch
                    s.release()
            except (OSError, pa.ArrowException) as e:
                raise InputFileError(f"--in_filename {self.path}: {f.path.name} is damaged ({e})") from e

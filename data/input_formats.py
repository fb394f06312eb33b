"""Readers for the inputs of pre-tokenization: items with ids, streamed where the format allows.

Formats (``--in_format``; ``auto`` picks by path):
    json    a Lumina JSON list ``[{"conversations": [...], "image": [paths] | path}, ...]`` (``*.json``)
    llava   a LLaVA JSON list: ``<image>`` markers become ``<|image|>``, ``"image"`` is one path
            (``auto`` picks it for a ``*.json`` whose messages use ``<image>`` and never ``<|image|>``)
    jsonl   one Lumina item per line (``*.jsonl``), streamed: memory does not grow with the file
    wds     a directory of webdataset ``*.tar`` shards; a sample is the members sharing a key: an image
            (jpg/jpeg/png/webp), a ``json`` with ``question`` and a ``txt`` answer -> one human turn
            and one assistant turn. Shards are taken in name order, members in archive order.
    energon a dataset prepared by Megatron-Energon's ``energon prepare`` (a directory with ``.nv-meta/``;
            ``auto`` picks it for such a directory): the shards of one split (``--energon_split``) of
            ``.nv-meta/split.yaml``, in its order, samples in archive order, excluded ones left out; the
            sample type and field map of ``.nv-meta/dataset.yaml``: ``VQASample`` (``VQAWebdataset``)
            -> image, ``context`` as the human turn, ``answers`` (the first, if a list) as the assistant
            turn; ``CaptioningSample`` (``CaptioningWebdataset``) -> a human turn that is just the image,
            ``caption`` as the assistant turn. Other sample types, and ``sample_loader`` code, are refused.

An item's id is its 0-based position in the input (for JSONL: among the non-blank lines). A reader
yields, for each id of a range in order, an :class:`InputItem` holding either the item (a dict in
Lumina's form) or the reason the raw item could not be read (a non-JSON line, a sample without an
image...). A bad FILE (missing, not JSON, not a list, no shards) raises :class:`InputFileError` when
the source is opened, before any work.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

FORMATS = ("auto", "json", "llava", "jsonl", "wds", "energon")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LUMINA_MARKER = "<|image|>"
LLAVA_MARKER = "<image>"
ENERGON_META = ".nv-meta"  # what `energon prepare` adds to a directory of webdataset shards

# JSONL: byte offset of every JSONL_CHECKPOINT_EVERY-th item is kept from the counting pass, so a rank
# (or a resumed run) seeks near its first item instead of re-reading the lines before it, while the
# memory kept stays tiny (1M lines -> 16 offsets).
JSONL_CHECKPOINT_EVERY = 65536
# A file is rejected as "not JSONL" when none of its first lines parse; one bad line later is an item.
JSONL_PROBE_LINES = 100


# json.loads recurses per nesting level: a line like "[[[[..." 100000 deep raises RecursionError, which
# would stop the run (seen in the reliability suite); it is reported like any unreadable item instead.
NESTED_TOO_DEEPLY = "JSON nested too deeply (more levels than Python's recursion limit)"


class InputFileError(ValueError):
    """The input file itself is unusable (missing, not JSON, wrong shape); the run stops at once."""


@dataclass(frozen=True)
class InputItem:
    """One input position: ``item`` (Lumina form) or ``error`` (why the raw item is unreadable)."""

    id: int
    where: str  # e.g. "data.jsonl line 7", "shard-0003.tar sample 000042"
    item: dict | None = None
    error: str | None = None


def rank_range(num_items: int, rank: int, splits: int) -> range:
    """The contiguous ids of rank ``rank`` of ``splits``: [r*ceil(N/S), (r+1)*ceil(N/S)) within [0, N)."""
    if splits < 1 or not 0 <= rank < splits:
        raise ValueError(f"rank {rank} is not in [0, splits={splits})")
    per = math.ceil(num_items / splits) if num_items else 0
    return range(min(rank * per, num_items), min((rank + 1) * per, num_items))


def llava_to_lumina(item: dict) -> dict:
    """LLaVA item -> Lumina item: ``<image>`` -> ``<|image|>`` in every message; other keys kept."""
    convs = item.get("conversations")
    if not isinstance(convs, list):
        return item
    out = dict(item)
    out["conversations"] = [
        {**m, "value": m["value"].replace(LLAVA_MARKER, LUMINA_MARKER)}
        if isinstance(m, dict) and isinstance(m.get("value"), str) else m
        for m in convs
    ]
    return out


def _messages(item) -> Iterator[str]:
    if isinstance(item, dict) and isinstance(item.get("conversations"), list):
        for m in item["conversations"]:
            if isinstance(m, dict) and isinstance(m.get("value"), str):
                yield m["value"]


def _looks_like_llava(items: list) -> bool:
    has_llava = False
    for it in items:
        for v in _messages(it):
            if LUMINA_MARKER in v:
                return False
            has_llava = has_llava or LLAVA_MARKER in v
    return has_llava


def _check_item(raw, where: str) -> tuple[dict | None, str | None]:
    if not isinstance(raw, dict):
        return None, (f"{where}: expected a JSON object with \"conversations\", "
                      f"got a {type(raw).__name__}")
    return raw, None


class JsonListSource:
    """A Lumina (or LLaVA) JSON list, read whole like Lumina does."""

    def __init__(self, path: Path, llava: bool | None = None):
        self.path = path
        self.base_dir = path.parent
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            raise InputFileError(f"--in_filename {path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(f"--in_filename {path}: not a JSON file ({e}); a Lumina input is a "
                                 f"JSON list of items, or use a .jsonl file with one item per line") from e
        except RecursionError as e:
            raise InputFileError(f"--in_filename {path}: not a usable JSON file: {NESTED_TOO_DEEPLY}") from e
        if not isinstance(data, list):
            raise InputFileError(f"--in_filename {path}: expected a JSON list of items, got a "
                                 f"{type(data).__name__}" +
                                 (f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else ""))
        self.llava = _looks_like_llava(data) if llava is None else llava
        self.format = "llava" if self.llava else "json"
        self._items = data

    def __len__(self) -> int:
        return len(self._items)

    def iter_items(self, ids: range) -> Iterator[InputItem]:
        for i in ids:
            where = f"{self.path.name} item {i}"
            item, err = _check_item(self._items[i], where)
            if item is not None and self.llava:
                item = llava_to_lumina(item)
            yield InputItem(i, where, item, err)


class JsonlSource:
    """One JSON item per non-blank line, streamed: a counting pass, then a seek near the first id."""

    format = "jsonl"

    def __init__(self, path: Path):
        self.path = path
        self.base_dir = path.parent
        self._n = 0
        self._checkpoints: list[tuple[int, int]] = []  # (byte offset, line number) of item k*EVERY
        probed, parsed = 0, False
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise InputFileError(f"--in_filename {path}: file not found") from None
        with f:
            offset, lineno = 0, 0
            for line in f:
                lineno += 1
                if line.strip():
                    if self._n % JSONL_CHECKPOINT_EVERY == 0:
                        self._checkpoints.append((offset, lineno))
                    if not parsed and probed < JSONL_PROBE_LINES:
                        probed += 1
                        parsed = self._parse(line, lineno)[1] is None
                    self._n += 1
                offset += len(line)
        if probed and not parsed:
            raise InputFileError(f"--in_filename {path}: not a JSONL file (none of its first {probed} "
                                 f"non-blank lines is a JSON value)")

    def __len__(self) -> int:
        return self._n

    def _parse(self, line: bytes, lineno: int) -> tuple[dict | None, str | None]:
        where = f"{self.path.name} line {lineno}"
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            raw = json.loads(line)
        except UnicodeDecodeError as e:
            return None, f"{where}: not UTF-8 text ({e})"
        except RecursionError:
            return None, f"{where}: not a usable JSON line: {NESTED_TOO_DEEPLY}"
        except json.JSONDecodeError as e:
            text = line.decode("utf-8", "replace").strip()
            preview = text[:80] + ("..." if len(text) > 80 else "")
            return None, f"{where}: not a JSON line ({e.msg} at column {e.colno}): {preview!r}"
        return _check_item(raw, where)

    def iter_items(self, ids: range) -> Iterator[InputItem]:
        if not len(ids):
            return
        k = ids.start // JSONL_CHECKPOINT_EVERY
        offset, lineno = self._checkpoints[k]
        i = k * JSONL_CHECKPOINT_EVERY
        with open(self.path, "rb") as f:
            f.seek(offset)
            lineno -= 1
            for line in f:
                lineno += 1
                if not line.strip():
                    continue
                if i >= ids.stop:
                    return
                if i >= ids.start:
                    item, err = self._parse(line, lineno)
                    yield InputItem(i, f"{self.path.name} line {lineno}", item, err)
                i += 1
        if i < ids.stop:
            raise InputFileError(f"--in_filename {self.path}: the file shrank while being read "
                                 f"(expected {ids.stop} items, found {i})")


_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key = up to first dot


def _wds_split(name: str) -> tuple[str, str] | None:
    m = _WDS_KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class WdsSource:
    """A directory of webdataset tar shards, read with :mod:`tarfile` (headers only when counting)."""

    format = "wds"

    def __init__(self, path: Path):
        self.path = path
        self.base_dir = path
        if not path.exists():
            raise InputFileError(f"--in_filename {path}: directory not found")
        self.shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not self.shards:
            raise InputFileError(f"--in_filename {path}: no webdataset .tar shards in this directory")
        self._counts = [self._count(s) for s in self.shards]

    def _open(self, shard: Path) -> tarfile.TarFile:
        try:
            return tarfile.open(shard, "r:")
        except (tarfile.TarError, OSError) as e:
            raise InputFileError(f"--in_filename {self.path}: shard {shard.name} is not a readable "
                                 f"uncompressed tar ({e})") from e

    def _count(self, shard: Path) -> int:
        with self._open(shard) as tf:
            return sum(1 for _ in self._samples(tf, shard))

    def _samples(self, tf: tarfile.TarFile, shard: Path):
        """Yields (key, [(ext, member)]) for consecutive members sharing a key (webdataset grouping)."""
        key, members = None, []
        try:
            for m in tf:
                if not m.isfile():
                    continue
                split = _wds_split(m.name)
                if split is None:
                    continue
                if split[0] != key:
                    if members:
                        yield key, members
                    key, members = split[0], []
                members.append((split[1], m))
        except tarfile.TarError as e:
            raise InputFileError(f"--in_filename {self.path}: shard {shard.name} is damaged ({e})") from e
        if members:
            yield key, members

    def __len__(self) -> int:
        return sum(self._counts)

    def iter_items(self, ids: range) -> Iterator[InputItem]:
        first = 0
        for shard, count in zip(self.shards, self._counts):
            if first >= ids.stop:
                return
            if first + count > ids.start:
                i = first
                with self._open(shard) as tf:
                    for key, members in self._samples(tf, shard):
                        if i >= ids.stop:
                            break
                        if i >= ids.start:
                            yield self._sample(i, shard, key, tf, members)
                        i += 1
            first += count

    def _sample(self, i: int, shard: Path, key: str, tf: tarfile.TarFile,
                members: list[tuple[str, tarfile.TarInfo]]) -> InputItem:
        where = f"{shard.name} sample {key}"
        by_ext = {}
        for ext, m in members:
            by_ext.setdefault(ext, m)
        image_ext = next((e for e in WDS_IMAGE_EXTS if e in by_ext), None)
        if image_ext is None:
            return InputItem(i, where, error=f"{where}: no image member (one of "
                                             f"{', '.join(WDS_IMAGE_EXTS)}); has {sorted(by_ext)}")
        if "json" not in by_ext:
            return InputItem(i, where, error=f"{where}: no .json member with a \"question\"")
        read = lambda ext: tf.extractfile(by_ext[ext]).read()  # noqa: E731
        try:
            meta = json.loads(read("json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return InputItem(i, where, error=f"{where}: {key}.json is not JSON ({e})")
        except RecursionError:
            return InputItem(i, where, error=f"{where}: {key}.json is not usable: {NESTED_TOO_DEEPLY}")
        if not isinstance(meta, dict) or not isinstance(meta.get("question"), str):
            return InputItem(i, where, error=f"{where}: {key}.json has no string \"question\"")
        if "txt" in by_ext:
            try:
                answer = read("txt").decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                return InputItem(i, where, error=f"{where}: {key}.txt is not UTF-8 text ({e})")
        elif isinstance(meta.get("answer"), str):
            answer = meta["answer"]
        else:
            return InputItem(i, where, error=f"{where}: no .txt answer (nor an \"answer\" in the json)")
        item = {"conversations": [{"from": "human", "value": meta["question"]},
                                  {"from": "gpt", "value": answer}],
                "image": [read(image_ext)]}
        return InputItem(i, where, item)


def open_input(path: str | Path, in_format: str = "auto", energon_split: str = "train"):
    """Opens ``path`` as a source of items (see the module docstring); checks the file at once."""
    path = Path(path)
    if in_format not in FORMATS:
        raise InputFileError(f"--in_format {in_format!r}: expected one of {', '.join(FORMATS)}")
    if in_format == "auto":
        if path.is_dir() and (path / ENERGON_META).is_dir():
            in_format = "energon"
        elif path.is_dir():
            in_format = "wds"
        elif path.suffix.lower() == ".jsonl":
            in_format = "jsonl"
        elif path.suffix.lower() == ".json":
            in_format = "json?"
        elif not path.exists():
            raise InputFileError(f"--in_filename {path}: file not found")
        else:
            raise InputFileError(f"--in_filename {path}: cannot tell the format from the name; pass "
                                 f"--in_format (one of json, llava, jsonl, wds, energon)")
    if in_format == "energon":
        from data.energon_input import EnergonSource

        return EnergonSource(path, energon_split)
    if in_format == "wds":
        if path.exists() and not path.is_dir():
            raise InputFileError(f"--in_filename {path}: --in_format wds needs a directory of .tar shards")
        return WdsSource(path)
    if path.is_dir():
        raise InputFileError(f"--in_filename {path}: is a directory; for webdataset shards use "
                             f"--in_format wds (or auto)")
    if in_format == "jsonl":
        return JsonlSource(path)
    return JsonListSource(path, llava={"json?": None, "json": False, "llava": True}[in_format])

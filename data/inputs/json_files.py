"""Lumina JSON lists, LLaVA JSON lists and JSONL files (``--in_format json | llava | jsonl``).

    json    a Lumina JSON list ``[{"conversations": [...], "image": [paths] | path}, ...]`` (``*.json``)
    llava   a LLaVA JSON list: ``<image>`` markers become ``<|image|>``, ``"image"`` is one path
            (``auto`` picks it for a ``*.json`` whose messages use ``<image>`` and never ``<|image|>``)
    jsonl   one Lumina item per line (``*.jsonl``), streamed: memory does not grow with the file
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from data.inputs.item import (LLAVA_MARKER, LUMINA_MARKER, NESTED_TOO_DEEPLY, InputFileError, InputItem, check_item,
                              llava_to_lumina)

# JSONL: byte offset of every JSONL_CHECKPOINT_EVERY-th item is kept from the counting pass, so a rank
# (or a resumed run) seeks near its first item instead of re-reading the lines before it, while the
# memory kept stays tiny (1M lines -> 16 offsets).
JSONL_CHECKPOINT_EVERY = 65536
# A file is rejected as "not JSONL" when none of its first lines parse; one bad line later is an item.
JSONL_PROBE_LINES = 100


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
            item, err = check_item(self._items[i], where)
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
        return check_item(raw, where)

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



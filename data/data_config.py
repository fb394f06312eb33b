"""The training data config: a YAML ``META`` list of record files, each with a ``type`` and a ``ratio``.

Format (Lumina-mGPT's, read with ``yaml.safe_load`` only)::

    META:
      - path: relative/or/absolute/record.json   # a record.json array or a {r}-of-{S}-record.jsonl
        type: t2i        # optional, default "default"; a global batch holds items of one type only
        ratio: 0.4       # optional, default 1.0; int(len * ratio) items are drawn per epoch

* ``path`` is relative to the directory of the YAML file (absolute paths are kept). It may name our
  pre-tokenized records (items in token shards) or Lumina's records (items in per-item ``.pkl``).
* ``ratio`` is a number >= 0. Below 1 a fresh random subset of int(len * ratio) items is drawn each
  epoch; above 1 every item is taken floor(ratio) times plus a random subset for the rest (so an
  item appears floor(ratio) or floor(ratio) + 1 times per epoch); 0 leaves the entry out. The count is
  computed exactly as ``int(len * ratio)`` (like Lumina), so ``ratio: 0.29`` of 100 items gives 28
  (0.29 * 100 = 28.999...).
* Any other key, a YAML tag that builds objects (``!!python/object``), or a bad value is an error that
  names the YAML file and the entry.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

ENTRY_KEYS = ("path", "type", "ratio")


class DataConfigError(ValueError):
    """The data config YAML is malformed (the message names the file and the entry)."""


@dataclass(frozen=True)
class DataSource:
    """One ``META`` entry: a record file, the batch type of its items, and how many to draw per epoch."""

    path: Path
    type: str = "default"
    ratio: float = 1.0


def _parse_entry(entry: object, where: str, base_dir: Path) -> DataSource:
    if not isinstance(entry, dict):
        raise DataConfigError(f"{where}: must be a mapping with 'path' (and optional 'type', 'ratio'), "
                              f"got {type(entry).__name__} {entry!r}")
    unknown = sorted(set(map(str, entry)) - set(ENTRY_KEYS))
    if unknown:
        raise DataConfigError(f"{where}: unknown key(s) {unknown}; an entry has only {list(ENTRY_KEYS)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        raise DataConfigError(f"{where}: 'path' must be a non-empty string, got {path!r}")
    type_ = entry.get("type", "default")
    if not isinstance(type_, str) or not type_.strip():
        raise DataConfigError(f"{where}: 'type' must be a non-empty string, got {type_!r}")
    ratio = entry.get("ratio", 1.0)
    # bool is an int subclass: `ratio: yes` would silently mean 1.
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
        raise DataConfigError(f"{where}: 'ratio' must be a finite number >= 0, got {ratio!r}")
    full = Path(os.path.expanduser(path))
    if not full.is_absolute():
        full = base_dir / full
    if not full.is_file():
        raise DataConfigError(f"{where}: record file {full} does not exist (relative paths are resolved "
                              f"against the YAML file's directory {base_dir})")
    return DataSource(path=full, type=type_, ratio=float(ratio))


def load_data_config(yaml_path: str | os.PathLike) -> list[DataSource]:
    """Reads a data config YAML into its sources, in ``META`` order. Raises DataConfigError on any problem."""
    yaml_path = Path(yaml_path)
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataConfigError(f"data config {yaml_path}: cannot read it ({e})") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        raise DataConfigError(f"data config {yaml_path}: refused a YAML tag that would build a Python "
                              f"object (only plain mappings, lists, strings and numbers are allowed): {e}") from e
    except yaml.YAMLError as e:
        raise DataConfigError(f"data config {yaml_path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict) or "META" not in doc:
        raise DataConfigError(f"data config {yaml_path}: expected a mapping with a 'META' list of entries "
                              f"({{path, type, ratio}}), got {type(doc).__name__}")
    extra = sorted(set(map(str, doc)) - {"META"})
    if extra:
        raise DataConfigError(f"data config {yaml_path}: unknown top-level key(s) {extra}; only 'META' is read")
    meta = doc["META"]
    if not isinstance(meta, list) or not meta:
        raise DataConfigError(f"data config {yaml_path}: 'META' must be a non-empty list of entries, got {meta!r}")
    base_dir = yaml_path.resolve().parent
    return [_parse_entry(e, f"data config {yaml_path}, META[{i}]", base_dir) for i, e in enumerate(meta)]

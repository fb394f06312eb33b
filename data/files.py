"""File-system helpers for durable writes: directory fsync, atomic replace of a small file.

Both sides use them (pre-tokenization's writer and records, the trainer's checkpoints); this module imports
nothing of the project, so importing it never pulls the record format or the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename or a new file in ``path`` durable (the directory entry, not only the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """temp file + fsync + rename + directory fsync: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

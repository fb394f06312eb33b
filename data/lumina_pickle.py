"""Reads Lumina-mGPT's per-item ``.pkl`` records without running code from them.

Lumina's pre_tokenize writes ``pickle.dump({"token": [...], "label": [...]}, f)`` per item. A pickle
can name any importable callable, so a plain ``pickle.load`` of a file from someone else's cluster
runs their code. Plain containers (dict, list, tuple, set), numbers, strings, bytes, booleans and None
are built by opcodes that never call ``find_class``; everything else needs ``find_class`` (or a
persistent id), and both are refused here.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a class or callable; we refuse to load it."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise UnsafePickleError(
            f"refused to load {module}.{name}: only plain containers and numbers are allowed in "
            f"Lumina .pkl records (this file may try to run code)")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refused persistent id {pid!r} in a Lumina .pkl record")


def loads_plain(data: bytes, where: str = "<bytes>"):
    """Unpickles ``data`` admitting only plain containers and numbers."""
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{where}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise pickle.UnpicklingError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e


def load_lumina_item(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Returns (tokens, labels) as int64 arrays from one Lumina ``.pkl`` record."""
    with open(path, "rb") as f:
        obj = loads_plain(f.read(), str(path))
    if not isinstance(obj, dict) or "token" not in obj or "label" not in obj:
        raise ValueError(f"{path}: a Lumina record must be a dict with 'token' and 'label' lists, "
                         f"got {type(obj).__name__}" + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else ""))
    tokens = np.asarray(obj["token"], dtype=np.int64)
    labels = np.asarray(obj["label"], dtype=np.int64)
    if tokens.ndim != 1 or tokens.shape != labels.shape:
        raise ValueError(f"{path}: 'token' ({tokens.shape}) and 'label' ({labels.shape}) must be "
                         f"lists of equal length")
    return tokens, labels

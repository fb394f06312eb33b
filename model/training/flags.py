"""Typed dataclass flags -> argparse: the one way the stage scripts (finetune_solver.py, generate.py) declare
their flags. Every field carries its help; booleans become explicit pairs (``--x`` and the field's ``neg``
name, e.g. ``--no_x``); ``choices``, ``nargs`` and ``action="append"`` come from the field's metadata."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field

# field annotations (strings under ``from __future__ import annotations``) -> argparse types
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str, "float | None": float,
          "list[str] | None": str}


def flag(default, help: str, **kw):
    """A dataclass field that is a flag: its default, its help, and argparse metadata (neg, choices, nargs)."""
    return field(default=default, metadata={"help": help, **kw})


def dataclass_parser(cls, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls`` (``description``: the script's
    docstring, printed as written so its example commands paste)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.type == "bool":
            p.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default,
                           help=f"{md['help']} (default: {'on' if f.default else 'off'})")
            p.add_argument(md["neg"], dest=f.name, action="store_false", help=f"turn --{f.name} off")
        elif md.get("action") == "append":
            p.add_argument(f"--{f.name}", dest=f.name, action="append", default=None, help=md["help"])
        else:
            p.add_argument(f"--{f.name}", dest=f.name, type=_TYPES[f.type], default=f.default, nargs=md.get("nargs"),
                           choices=md.get("choices"), help=f"{md['help']} (default: {f.default})")
    return p

"""What every input source yields: an :class:`InputItem` per id, or an :class:`InputFileError` for a bad file.

An item's id is its 0-based position in the input (for JSONL: among the non-blank lines). A reader
yields, for each id of a range in order, an :class:`InputItem` holding either the item (a dict in
Lumina's form) or the reason the raw item could not be read (a non-JSON line, a sample without an
image...). A bad FILE (missing, not JSON, not a list, no shards) raises :class:`InputFileError` when
the source is opened, before any work. ``rank_range`` splits the ids among ``--splits`` ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LUMINA_MARKER = "<|image|>"
LLAVA_MARKER = "<image>"

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


def check_item(raw, where: str) -> tuple[dict | None, str | None]:
    """(item, None) for a JSON object, else (None, why): what every JSON-based reader does with a raw item."""
    if not isinstance(raw, dict):
        return None, (f"{where}: expected a JSON object with \"conversations\", "
                      f"got a {type(raw).__name__}")
    return raw, None



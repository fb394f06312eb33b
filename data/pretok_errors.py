"""What pre-tokenization rejects and what stops it: bad input, a bug, too many rejections.

- **Bad input** is rejected: the item gets one line in ``errors.jsonl`` and the run goes on. Bad input is
  what the item's own data can cause: :class:`~data.item_processor.ItemError` (conversation shape, roles,
  ``<|image|>`` markers), :class:`~data.image_preprocess.ImageLoadError` and
  :class:`~data.inputs.video.VideoLoadError` (missing, empty, undecodable, truncated media), an input line
  that does not parse (reason ``input``) and a decoder that kills its worker process (reason ``crash``).
- **Anything else** raised while preparing or assembling an item is a bug (in our code, a library, or the
  environment), not bad data: the run stops (exit 1) with the item and the traceback (:class:`PreTokenizeBug`).
  The items before it are committed and nothing is marked done, so the same command after the fix continues
  at that item, exactly once.
- **Too many rejections** mean a wrong setting, not bad data (a wrong ``--image_root`` rejects every item):
  like energon's ``failure_tolerance``, the run stops (exit 3, :class:`TooManyErrors`) when more than
  ``--max_consecutive_errors`` items in a row are rejected, or, once ``MIN_ITEMS_FOR_RATE`` items are done,
  when the share rejected exceeds ``--max_error_rate``. The message gives the three most common reasons and
  what to check. Nothing of that run is kept (its records and rejections are cut off again), so the fixed
  re-run redoes its items: rejections caused by the wrong setting do not stay.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from data.image_preprocess import ImageLoadError

MIN_ITEMS_FOR_RATE = 200  # the error rate is judged only after this many items of the run (energon: 100)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that reject an item (imported late: the item processor pulls in the tokenizer)."""
    from data.inputs.video import VideoLoadError
    from data.item_processor import ItemError

    return ItemError, ImageLoadError, VideoLoadError


def is_bad_input(exc: BaseException) -> bool:
    return isinstance(exc, bad_input_errors())


def classify(exc: BaseException) -> str:
    """Short reason of a bad-input error for the summary: video, image, or conversation (roles, markers, shape)."""
    from data.inputs.video import VideoLoadError

    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(c, VideoLoadError) for c in chain):
        return "video"
    if any(isinstance(c, ImageLoadError) for c in chain):
        return "image"
    return "conversation"


class PreTokenizeBug(RuntimeError):
    """An item raised an exception that is not bad input: the run stops instead of rejecting the item."""

    def __init__(self, where: str, item_id: int, stage: str, tb: str):
        self.where, self.item_id, self.stage, self.tb = where, item_id, stage, tb
        last = tb.strip().splitlines()[-1] if tb.strip() else "?"
        super().__init__(
            f"{where} (id {item_id}): {last} raised while {stage} this item. That is a bug (in the code, a "
            f"library or the environment), not bad data: only ItemError, ImageLoadError and VideoLoadError reject "
            f"an item, so the run stops here instead of reporting every item as bad. Nothing is marked done; the "
            f"items before this one are saved. Fix the cause and re-run the same command: it continues at this "
            f"item.\n{tb.rstrip()}")


class TooManyErrors(RuntimeError):
    """More items rejected than --max_error_rate / --max_consecutive_errors allow: a setting is wrong."""


_PATH = re.compile(r"(?:[A-Za-z]:)?[^\s:'\"()]*[/\\][^\s:'\"()]*")
_NUMBER = re.compile(r"\d+")


def _pattern(message: str, where: str) -> str:
    """The message without what differs between items (their place in the input, paths, numbers)."""
    if message.startswith(where + ": "):
        message = message[len(where) + 2:]
    return _NUMBER.sub("N", _PATH.sub("<path>", message))[:200]


@dataclass
class FailureTolerance:
    """Counts the rejections of a run in id order; ``add`` raises TooManyErrors beyond the limits.
    ``max_consecutive_errors`` 0 and ``max_error_rate`` 1 switch a check off. ``hint`` says what to check."""

    max_error_rate: float
    max_consecutive_errors: int
    hint: str = ""
    items: int = 0
    errors: int = 0
    consecutive: int = 0
    patterns: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, where: str, error: str | None, reason: str | None) -> None:
        self.items += 1
        if error is None:
            self.consecutive = 0
            return
        self.errors += 1
        self.consecutive += 1
        key = (reason or "other", _pattern(error, where))
        self.patterns[key] += 1
        self.examples.setdefault(key, error)
        if self.max_consecutive_errors and self.consecutive > self.max_consecutive_errors:
            self._stop(f"{self.consecutive} items in a row were rejected (more than --max_consecutive_errors "
                       f"{self.max_consecutive_errors})")
        if self.items >= MIN_ITEMS_FOR_RATE and self.errors / self.items > self.max_error_rate:
            self._stop(f"{self.errors} of the {self.items} items of this run were rejected "
                       f"({100 * self.errors / self.items:.0f}%, more than --max_error_rate {self.max_error_rate:g})")

    def _stop(self, what: str) -> None:
        lines = [f"stopped: {what}. So many rejections usually mean a wrong setting, not bad data. The most common "
                 f"reasons:"]
        for (reason, pattern), n in self.patterns.most_common(3):
            lines.append(f"  {n} x [{reason}] {pattern}\n      e.g. {self.examples[(reason, pattern)]}")
        lines.append(f"Check {self.hint}. Nothing of this run was kept: once fixed, the same command redoes its "
                     f"items. If the data really is this bad, raise --max_error_rate (1 = off) or "
                     f"--max_consecutive_errors (0 = off).")
        raise TooManyErrors("\n".join(lines))

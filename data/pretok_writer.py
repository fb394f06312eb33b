"""Exactly-once output of one pre-tokenization rank: token shard, record lines, error lines, markers.

Files of rank r of S in ``out_dir`` (formats of the first three in :mod:`data.records`):
    {r}-of-{S}-tokens.bin     token shard (append-only)
    {r}-of-{S}-record.jsonl   {"id", "file", "len", "offset"} per pre-tokenized item, in id order (items
                              with videos add "frames": frames per video)
    {r}-of-{S}-errors.jsonl   {"id", "error", "reason"} per rejected item, in id order
    {r}-of-{S}-run.json       what this rank is made from (input size, id range, target size, bundle
                              fingerprint); written before any item, checked on every re-run
    {r}-of-{S}-done.json      written last, atomically: the rank is complete (counts inside)
    {r}-of-{S}-discard.json   only while a run's output is being discarded (``RankWriter.discard_this_run``)

Why a kill -9 at any moment loses and doubles nothing: items are appended to the shard, the shard is
fsynced, and only then are the record lines that point into it written (then flushed and fsynced,
together with the error lines of the same commit). Each of the two line files is therefore a prefix of
what an uninterrupted run writes, and every shard byte a record points at is durable. On restart,
:func:`scan_outputs` drops a torn last line, finds the first id that is in neither file (everything
before it is done), remembers the few ids after it that are (the other file of the last commit got
them), truncates the shard to the end of the last recorded item, and the run redoes exactly the
missing ids. Processing is deterministic, so the files come out byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import hashlib
import heapq
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.files import fsync_dir, write_json_atomic
from data.records import (Record, RecordFormatError, ShardWriter, errors_name, record_name, shard_end_bytes,
                          shard_name)

logger = logging.getLogger(__name__)

RUN_FORMAT = "lumina-stack-pretokenize-run"
DONE_FORMAT = "lumina-stack-pretokenize-done"
RUN_VERSION = 1
# run.json keys that must match on a re-run; the others (paths) are informational.
# A killed run's worker processes die with it, but a moment later (they get SIGKILL from the kernel when
# their parent dies); an immediate re-run waits this long for them before calling the rank busy.
LOCK_WAIT_SECONDS = 10.0
# Settings that change the output but are written only when not at their default (so output directories
# made before they existed continue), and are copied into done.json.
RUN_OPTIONAL_KEYS = ("image_fit", "video_frames", "video_fps", "video_max_frames", "video_target_size",
                     "energon_split", "hf_split", "field_map")
RUN_CHECKED_KEYS = ("version", "rank", "splits", "num_items", "start", "end", "in_format",
                    "target_size", "tokenizer_sha256") + RUN_OPTIONAL_KEYS


def run_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-run.json"


def done_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-done.json"


def discard_name(rank: int, splits: int) -> str:
    return f"{rank}-of-{splits}-discard.json"


def _finish_discard(out_dir: Path, rank: int, splits: int) -> None:
    """Completes a ``RankWriter.discard_this_run`` that its marker records (idempotent: a crash anywhere in
    it, and the next open finishes it)."""
    marker = out_dir / discard_name(rank, splits)
    if not marker.exists():
        return
    try:
        sizes = json.loads(marker.read_text(encoding="utf-8"))
        cuts = [(out_dir / record_name(rank, splits), int(sizes["records_bytes"])),
                (out_dir / errors_name(rank, splits), int(sizes["errors_bytes"]))]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise OutputConflictError(f"{marker}: damaged ({e}); delete this rank's files and re-run") from e
    for path, size in cuts:
        try:
            if path.exists() and path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)
                    os.fsync(f.fileno())
        except OSError as e:
            raise _write_failed(path, e) from e
    marker.unlink()
    fsync_dir(out_dir)


class OutputConflictError(RuntimeError):
    """``out_dir`` holds output that this run cannot continue (other settings, damage, a live writer)."""


class OutputWriteError(RuntimeError):
    """Writing an output file failed (disk full, quota, file size limit, I/O error). What was committed
    before is intact, so the same command, re-run once the cause is fixed, continues where it stopped."""


def _write_failed(path: Path, e: OSError) -> OutputWriteError:
    return OutputWriteError(f"{path}: cannot write ({e.strerror or e}). The output committed so far is intact: "
                            f"free space (or fix the file system) and re-run the same command; it continues "
                            f"where it stopped")


def bundle_fingerprint(bundle_dir: str | os.PathLike) -> str:
    """sha256 over the bundle's files (name + bytes), so a re-run with other weights is caught."""
    h = hashlib.sha256()
    for p in sorted(Path(bundle_dir).iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- resume


class _LineFile:
    """Iterates the ids of a record or errors file, checking order and range, and tracking where the
    complete lines end (``good_bytes``) so a torn tail can be cut off."""

    def __init__(self, path: Path, ids: range, shard: str | None):
        self.path, self.ids, self.shard = path, ids, shard  # shard: expected "file" of records
        self.good_bytes = 0
        self.count = 0
        self.last: Record | None = None
        self.torn = False

    def __iter__(self) -> Iterator[int]:
        if not self.path.exists():
            return
        prev = None
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    self.torn = True  # a kill mid-write; everything before it is complete
                    return
                where = f"{self.path}:{lineno}"
                try:
                    d = json.loads(line)
                    i = int(d["id"])
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                    raise OutputConflictError(f"{where}: damaged line ({e}); this rank's output cannot "
                                              f"be continued: delete its files and re-run") from e
                if i not in self.ids or (prev is not None and i <= prev):
                    raise OutputConflictError(f"{where}: id {i} is out of order or outside this rank's "
                                              f"range [{self.ids.start}, {self.ids.stop}); was this "
                                              f"directory written by another run?")
                if self.shard is not None:
                    try:
                        rec = Record.from_dict(d, where)
                    except RecordFormatError as e:
                        raise OutputConflictError(f"{e}; was this directory written by another tool?") from e
                    expect = 0 if self.last is None else self.last.offset + 2 * self.last.len
                    if rec.file != self.shard or rec.offset != expect:
                        raise OutputConflictError(
                            f"{where}: record {rec} does not continue shard {self.shard} at element "
                            f"{expect}; was this directory written by another tool?")
                    self.last = rec
                prev = i
                self.count += 1
                self.good_bytes += len(line)
                yield i


@dataclass
class ResumeState:
    """Where a rank stands: redo ``range(next_id, end)`` except ``skip``."""

    next_id: int
    skip: frozenset[int]
    shard_bytes: int
    records_bytes: int
    errors_bytes: int
    num_records: int
    num_errors: int
    torn: bool = False

    def todo(self, end: int) -> Iterator[int]:
        return (i for i in range(self.next_id, end) if i not in self.skip)


def scan_outputs(out_dir: Path, rank: int, splits: int, ids: range) -> ResumeState:
    """Reads a rank's record and errors files (streaming) and says what is done and what is not."""
    recs = _LineFile(out_dir / record_name(rank, splits), ids, shard_name(rank, splits))
    errs = _LineFile(out_dir / errors_name(rank, splits), ids, None)
    expected, gap, after = ids.start, None, set()
    for i in heapq.merge(recs, errs):
        if gap is None and i == expected:
            expected += 1
            continue
        if i < expected or i in after:
            raise OutputConflictError(f"{out_dir}: id {i} is in both {recs.path.name} and "
                                      f"{errs.path.name}; the output is damaged")
        gap = expected if gap is None else gap
        after.add(i)
    shard_bytes = 16 if recs.last is None else shard_end_bytes(recs.last.offset, recs.last.len)
    shard = out_dir / shard_name(rank, splits)
    have = shard.stat().st_size if shard.exists() else 0
    if recs.last is not None and have < shard_bytes:
        raise OutputConflictError(f"{shard}: {have} bytes, but its records need {shard_bytes}; the "
                                  f"shard was damaged or replaced: delete this rank's files and re-run")
    return ResumeState(next_id=expected if gap is None else gap, skip=frozenset(after),
                       shard_bytes=shard_bytes, records_bytes=recs.good_bytes,
                       errors_bytes=errs.good_bytes, num_records=recs.count, num_errors=errs.count,
                       torn=recs.torn or errs.torn)


# ----------------------------------------------------------------------------------------- writer


@dataclass
class RankWriter:
    """Appends items and errors of one rank, committing them durably and in id order.

    Use: ``w = RankWriter.open(...)``; if ``w.finished`` there is nothing to do; else process
    ``w.state.todo(end)`` in order calling ``add``/``add_error``, ``commit()`` now and then, ``finish()``.
    """

    out_dir: Path
    rank: int
    splits: int
    ids: range
    state: ResumeState | None = None
    finished: bool = False
    _lock_fd: int | None = None
    _shard: ShardWriter | None = None
    _rec_f: object = None
    _err_f: object = None
    _rec_lines: list[str] = field(default_factory=list)
    _err_lines: list[str] = field(default_factory=list)
    _last_id: int = -1
    _settings: dict = field(default_factory=dict)

    @classmethod
    def open(cls, out_dir: str | os.PathLike, rank: int, splits: int, ids: range, run_info: dict) -> "RankWriter":
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        w = cls(out_dir, rank, splits, ids)
        w._settings = {k: run_info[k] for k in RUN_OPTIONAL_KEYS if k in run_info}
        shard_path = out_dir / shard_name(rank, splits)
        # One writer per rank: a lock on the shard (released by the kernel when the process dies).
        w._lock_fd = os.open(shard_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(w._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(w._lock_fd)
                    raise OutputConflictError(f"{shard_path}: another process is writing rank {rank} of "
                                              f"{splits} into {out_dir}") from None
                time.sleep(0.05)
        try:
            w._check_run_info(run_info)
            if (out_dir / done_name(rank, splits)).exists():
                w.finished = True
                return w
            _finish_discard(out_dir, rank, splits)  # a discard that a crash interrupted
            w.state = scan_outputs(out_dir, rank, splits, ids)
            try:
                w._shard = ShardWriter(shard_path, truncate_to=w.state.shard_bytes)
            except OSError as e:
                raise _write_failed(shard_path, e) from e
            w._rec_f = w._open_lines(out_dir / record_name(rank, splits), w.state.records_bytes)
            w._err_f = w._open_lines(out_dir / errors_name(rank, splits), w.state.errors_bytes)
        except BaseException:
            w.close()
            raise
        return w

    def _check_run_info(self, run_info: dict) -> None:
        info = {"format": RUN_FORMAT, "version": RUN_VERSION, "rank": self.rank, "splits": self.splits,
                "start": self.ids.start, "end": self.ids.stop, **run_info}
        path = self.out_dir / run_name(self.rank, self.splits)
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise OutputConflictError(f"{path}: not JSON ({e}); delete it and this rank's files") from e
            diff = [k for k in RUN_CHECKED_KEYS if old.get(k) != info.get(k)]
            if diff:
                raise OutputConflictError(
                    f"{self.out_dir} holds rank {self.rank} of {self.splits} made with other settings ("
                    + ", ".join(f"{k}: {old.get(k)!r} there, {info.get(k)!r} now" for k in diff)
                    + "); use another --out_dir or delete that rank's files")
        else:
            try:
                write_json_atomic(path, info)
            except OSError as e:
                raise _write_failed(path, e) from e

    @staticmethod
    def _open_lines(path: Path, good_bytes: int):
        f = open(path, "ab")
        if f.tell() != good_bytes:
            f.truncate(good_bytes)  # a torn last line from a killed run
            f.seek(good_bytes)
        return f

    def _check_order(self, i: int) -> None:
        if i <= self._last_id or i < self.state.next_id or i >= self.ids.stop or i in self.state.skip:
            raise ValueError(f"item {i} is out of order or already written (last {self._last_id})")
        self._last_id = i

    def add(self, i: int, tokens, labels, extra: dict | None = None) -> Record:
        """Appends item ``i`` to the shard; its record line (with ``extra`` keys, if any) is written at
        the next commit."""
        self._check_order(i)
        try:
            offset = self._shard.append(tokens, labels)
        except OSError as e:
            raise _write_failed(self._shard.path, e) from e
        rec = Record(id=i, file=self._shard.path.name, len=len(tokens), offset=offset)
        line = rec.to_json() if not extra else json.dumps({**json.loads(rec.to_json()), **extra}, ensure_ascii=False)
        self._rec_lines.append(line + "\n")
        return rec

    def add_error(self, i: int, error: str, reason: str) -> None:
        self._check_order(i)
        # A message can quote the item's own text, which JSON input may give as a lone surrogate
        # ("\ud800" escapes): such a str cannot be encoded as UTF-8 and would stop the run at every commit.
        error = error.encode("utf-8", "backslashreplace").decode("utf-8")
        self._err_lines.append(json.dumps({"id": i, "error": error, "reason": reason},
                                          ensure_ascii=False) + "\n")

    @property
    def last_id(self) -> int | None:
        """The last id written (added) by this run, None before the first."""
        return self._last_id if self._last_id >= 0 else None

    @property
    def uncommitted(self) -> int:
        return len(self._rec_lines) + len(self._err_lines)

    def commit(self) -> None:
        """Makes everything added so far durable: shard first, then the lines that point into it."""
        if not self.uncommitted:
            return
        try:
            self._shard.sync()
        except OSError as e:
            raise _write_failed(self._shard.path, e) from e
        for f, lines in ((self._rec_f, self._rec_lines), (self._err_f, self._err_lines)):
            if lines:
                try:
                    f.write("".join(lines).encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as e:
                    raise _write_failed(Path(f.name), e) from e
                lines.clear()

    def discard_this_run(self) -> int:
        """Cuts the record and error files back to where they were at ``open``: nothing this run did is kept
        (after too many rejections: a wrong setting, whose rejections must not stay once it is fixed). The
        re-run then redoes exactly this run's items. The cut is made crash-safe by a marker that ``open``
        finishes: ``{r}-of-{S}-discard.json`` holds the lengths, and is removed once both files are cut (a
        partial cut, records without the errors between them, would not resume in order). Returns how many
        items were discarded."""
        n = self.uncommitted
        self._rec_lines.clear()
        self._err_lines.clear()
        for f in (self._rec_f, self._err_f):
            f.flush()
        sizes = {"records_bytes": self.state.records_bytes, "errors_bytes": self.state.errors_bytes}
        for key, f in (("records_bytes", self._rec_f), ("errors_bytes", self._err_f)):
            with open(f.name, "rb") as r:
                r.seek(sizes[key])
                n += r.read().count(b"\n")
        marker = self.out_dir / discard_name(self.rank, self.splits)
        try:
            write_json_atomic(marker, sizes)
        except OSError as e:
            raise _write_failed(marker, e) from e
        _finish_discard(self.out_dir, self.rank, self.splits)
        return n

    def finish(self) -> dict:
        """Commits, checks that every id of the range is accounted for, writes the done marker."""
        self.commit()
        state = scan_outputs(self.out_dir, self.rank, self.splits, self.ids)
        if state.next_id != self.ids.stop or state.skip:
            raise OutputConflictError(f"{self.out_dir}: rank {self.rank} of {self.splits} ends with "
                                      f"ids missing from id {state.next_id}; the output is damaged")
        summary = summarize(self.out_dir, self.rank, self.splits)
        done = self.out_dir / done_name(self.rank, self.splits)
        try:
            write_json_atomic(done, {"format": DONE_FORMAT, "version": RUN_VERSION, "rank": self.rank,
                                     "splits": self.splits, "start": self.ids.start, "end": self.ids.stop,
                                     **self._settings, **summary})
        except OSError as e:
            raise _write_failed(done, e) from e
        self.finished = True
        return summary

    def close(self) -> None:
        # Closing flushes; after a write error (disk still full) that fails again. Every file is closed
        # anyway, the lock last, and the first error is the one reported (uncommitted bytes are cut on resume).
        for f in (self._rec_f, self._err_f, self._shard):
            try:
                if f is not None:
                    f.close()
            except OSError as e:
                logger.warning("%s: %s while closing (the re-run cuts what was not committed)",
                               getattr(f, "name", None) or getattr(f, "path", "?"), e.strerror or e)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RankWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(out_dir: Path, rank: int, splits: int) -> dict:
    """Counts of a rank's output read back from its files: records, tokens, errors by reason (and videos
    and their frames, when there are any)."""
    records = tokens = videos = frames = 0
    rp = out_dir / record_name(rank, splits)
    if rp.exists():
        with open(rp, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    d = json.loads(line)
                    records += 1
                    tokens += int(d["len"])
                    videos += len(d.get("frames", ()))
                    frames += sum(d.get("frames", ()))
    reasons: Counter[str] = Counter()
    ep = out_dir / errors_name(rank, splits)
    if ep.exists():
        with open(ep, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    reasons[json.loads(line).get("reason", "other")] += 1
    out = {"records": records, "tokens": tokens, "errors": sum(reasons.values()),
           "errors_by_reason": dict(sorted(reasons.items()))}
    if videos:
        out.update(videos=videos, frames=frames)
    return out

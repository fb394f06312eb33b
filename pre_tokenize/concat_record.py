"""Merges the per-rank records of pre_tokenize.py into one record file plus its compact index.

    python pre_tokenize/concat_record.py --sub_record_dir out/ --save_path out/record.json
    python pre_tokenize/concat_record.py --sub_record_dir out/ --save_path out/record.json --allow_incomplete

Reads every ``{r}-of-{S}-record.jsonl`` in ``--sub_record_dir`` (rank order, which is id order) and writes
``--save_path`` as one JSON array of records (Lumina's record.json shape: ``{"id", "file", "len",
"offset"}``, ``file`` rewritten relative to the directory of ``--save_path``), then the index
``{save_path}.index/`` that the trainer memory-maps (``data.records.build_index``). Both are written
atomically: a temp file renamed over the target.

A rank counts as finished when pre_tokenize.py wrote its ``{r}-of-{S}-done.json`` (or, for Lumina's own
output, its ``{r}-of-{S}-progress.txt`` says ``finished``). If a rank of 0..S-1 is missing or unfinished,
the script lists them and exits with status 1 without writing anything, unless ``--allow_incomplete``
(then a torn last line of an unfinished rank is skipped, as Lumina does). Ids must be unique.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from data.pretok_writer import done_name
from data.records import Record, RecordFormatError, build_index

logger = logging.getLogger("concat_record")

SUB_RECORD = re.compile(r"^(\d+)-of-(\d+)-record\.jsonl?$")


@dataclass
class ConcatArgs:
    sub_record_dir: Path
    save_path: Path
    allow_incomplete: bool = False

    HELP = {
        "sub_record_dir": "directory holding the {r}-of-{S}-record.jsonl files of pre_tokenize.py (its --out_dir)",
        "save_path": "where to write the merged record file (a JSON array, e.g. out/record.json); its index "
                     "goes to {save_path}.index/",
        "allow_incomplete": "write the result even if some ranks are missing or unfinished (they are listed)",
    }


def parse_args(argv: list[str] | None = None) -> ConcatArgs:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(ConcatArgs):
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action="store_true", help=ConcatArgs.HELP[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=Path, required=True, help=ConcatArgs.HELP[f.name])
    return ConcatArgs(**vars(parser.parse_args(argv)))


class ConcatError(RuntimeError):
    """The sub-records cannot be merged as asked (incomplete set, mixed splits, duplicate ids)."""


@dataclass
class SubRecord:
    rank: int
    splits: int
    path: Path
    finished: bool


def find_sub_records(directory: Path) -> list[SubRecord]:
    if not directory.is_dir():
        raise ConcatError(f"--sub_record_dir {directory}: not a directory")
    subs = []
    for p in directory.iterdir():
        m = SUB_RECORD.match(p.name)
        if m:
            rank, splits = int(m.group(1)), int(m.group(2))
            subs.append(SubRecord(rank, splits, p, rank_finished(directory, rank, splits)))
    return sorted(subs, key=lambda s: (s.splits, s.rank))


def rank_finished(directory: Path, rank: int, splits: int) -> bool:
    if (directory / done_name(rank, splits)).exists():
        return True
    progress = directory / f"{rank}-of-{splits}-progress.txt"  # Lumina's marker
    return progress.exists() and progress.read_text().strip() == "finished"


def check_complete(directory: Path, subs: list[SubRecord]) -> list[str]:
    """Problems that make the set incomplete (empty list: complete). Raises on mixed --splits."""
    if not subs:
        raise ConcatError(f"--sub_record_dir {directory}: no {{r}}-of-{{S}}-record.jsonl files; run "
                          f"pre_tokenize/pre_tokenize.py with --out_dir {directory} first")
    splits = sorted({s.splits for s in subs})
    if len(splits) > 1:
        raise ConcatError(f"--sub_record_dir {directory}: records of runs with different --splits "
                          f"({', '.join(map(str, splits))}) are mixed; keep one run per directory")
    n = splits[0]
    have = {s.rank: s for s in subs}
    problems = []
    missing = [r for r in range(n) if r not in have]
    if missing:
        problems.append(f"missing ranks (no record file) of {n}: {_ranks(missing)}")
    unfinished = [s.rank for s in subs if not s.finished]
    if unfinished:
        problems.append(f"unfinished ranks of {n} (no {{r}}-of-{n}-done.json: still running, or killed; "
                        f"re-run the same pre_tokenize command): {_ranks(unfinished)}")
    return problems


def _ranks(rs: list[int]) -> str:
    return ", ".join(map(str, rs[:20])) + (f" ... ({len(rs)} in all)" if len(rs) > 20 else "")


def iter_sub_records(subs: list[SubRecord], save_dir: Path) -> Iterator[Record]:
    """Records of all ranks in rank order, ``file`` made relative to ``save_dir`` (absolute kept)."""
    for s in subs:
        if s.path.suffix == ".json":  # a JSON array per rank (Lumina's pattern admits it)
            yield from (_relocate(r, s.path.parent, save_dir) for r in _json_array(s.path))
            continue
        with open(s.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if not line.endswith(b"\n") and not s.finished:
                    logger.warning("%s: skipping the torn last line of an unfinished rank", s.path)
                    break
                where = f"{s.path}:{lineno}"
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordFormatError(f"{where}: not a JSON record line ({e})") from e
                yield _relocate(Record.from_dict(d, where), s.path.parent, save_dir)


def _json_array(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        arr = json.load(f)
    for i, d in enumerate(arr):
        yield Record.from_dict(d, f"{path}[{i}]")


def _relocate(rec: Record, src_dir: Path, save_dir: Path) -> Record:
    if os.path.isabs(rec.file):
        return rec
    return Record(rec.id, os.path.relpath(src_dir / rec.file, save_dir), rec.len, rec.offset)


def concat(args: ConcatArgs) -> dict:
    """Writes the merged record file and its index; returns counts."""
    subs = find_sub_records(args.sub_record_dir)
    problems = check_complete(args.sub_record_dir, subs)
    for p in problems:
        logger.warning("%s", p)
    if problems and not args.allow_incomplete:
        raise ConcatError("the pre-tokenized set is incomplete (" + "; ".join(problems) + "); nothing "
                          "written. Finish those ranks, or pass --allow_incomplete to merge what is there")
    save = args.save_path
    save_dir = save.parent.resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    tmp = save.with_name(f".{save.name}.tmp{os.getpid()}")
    ids = []
    tokens = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[")
            for n, rec in enumerate(iter_sub_records(subs, save_dir)):
                f.write(("\n" if n == 0 else ",\n") + rec.to_json())
                ids.append(rec.id)
                tokens += rec.len
            f.write("\n]\n")
            f.flush()
            os.fsync(f.fileno())
        arr = np.sort(np.asarray(ids, dtype=np.int64))
        dup = arr[1:][arr[1:] == arr[:-1]]
        if dup.size:
            raise ConcatError(f"ids are not unique across the sub-records: e.g. id {int(dup[0])} "
                              f"({dup.size} duplicates); were two runs mixed in {args.sub_record_dir}?")
        os.replace(tmp, save)
    finally:
        if tmp.exists():
            tmp.unlink()
    index = build_index(save, iter_sub_records(subs, save_dir))
    counts = {"records": len(ids), "tokens": tokens, "ranks": len(subs), "incomplete": bool(problems)}
    logger.info("wrote %s (%d records, %d tokens, from %d rank files) and %s", save, len(ids), tokens,
                len(subs), index)
    return counts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        concat(args)
    except (ConcatError, RecordFormatError, OSError, json.JSONDecodeError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

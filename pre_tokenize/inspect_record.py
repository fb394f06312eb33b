"""Shows pre-tokenized items the way the trainer will see them.

    python pre_tokenize/inspect_record.py out/record.json --ids 0 5 --tokenizer_dir ckpts/chameleon/tokenizer
    python pre_tokenize/inspect_record.py out/0-of-8-record.jsonl --limit 3          # bundle found via run.json
    python pre_tokenize/inspect_record.py out/record.json --json --ids 7              # {"id","len","token","label"}
    python pre_tokenize/inspect_record.py out/record.json --ids 7 --render /tmp/look  # PNGs via the VQGAN decoder
    python pre_tokenize/inspect_record.py lumina_out/files/12.pkl --tokenizer_dir B   # a Lumina per-item pickle

RECORD is a record file of ours (``*-record.jsonl`` or a concatenated ``record.json``), a Lumina record file
(entries pointing at per-item ``.pkl`` files) or one Lumina ``.pkl``. Pickles are read by a restricted
unpickler that admits only plain containers and numbers; anything else is refused (exit status 2).

The text view prints each item's decoded text with image blocks as ``[image HxW]`` (pixels) and the spans
the loss trains on (label != -100) between ``⟦`` and ``⟧`` (green instead when writing to a terminal).
It needs the tokenizer bundle: ``--tokenizer_dir``, or the one named in a ``*-run.json`` beside the record.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data.lumina_pickle import UnsafePickleError, load_lumina_item
from data.records import IGNORE_INDEX, Record, RecordFormatError, ShardReader, iter_record_file

logger = logging.getLogger("inspect_record")

OPEN, CLOSE = "⟦", "⟧"
GREEN, RESET = "\033[32m", "\033[0m"


@dataclass
class InspectArgs:
    record: Path
    ids: list[int] | None = None
    limit: int = 0
    json: bool = False
    render: Path | None = None
    tokenizer_dir: Path | None = None
    device: str = "cpu"

    HELP = {
        "record": "a record file (*-record.jsonl, record.json, Lumina's record with .pkl entries) or one .pkl",
        "ids": "item ids to show (default: all, in file order)",
        "limit": "show at most this many items (0: no limit)",
        "json": "print one JSON line per item: {\"id\", \"len\", \"token\", \"label\"} (no bundle needed)",
        "render": "write each image block as a PNG decoded by the VQGAN decoder into this directory "
                  "({id}_{k}.png)",
        "tokenizer_dir": "tokenizer bundle used for pre-tokenization (default: from a *-run.json beside RECORD)",
        "device": "device for the VQGAN decoder with --render (cpu, cuda, cuda:1)",
    }


def parse_args(argv: list[str] | None = None) -> InspectArgs:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    h = InspectArgs.HELP
    parser.add_argument("record", type=Path, help=h["record"])
    parser.add_argument("--ids", type=int, nargs="+", default=None, help=h["ids"])
    parser.add_argument("--limit", type=int, default=0, help=h["limit"])
    parser.add_argument("--json", action="store_true", help=h["json"])
    parser.add_argument("--render", type=Path, default=None, help=h["render"])
    parser.add_argument("--tokenizer_dir", type=Path, default=None, help=h["tokenizer_dir"])
    parser.add_argument("--device", type=str, default="cpu", help=h["device"])
    args = InspectArgs(**vars(parser.parse_args(argv)))
    if args.limit < 0:
        parser.error(f"--limit must be >= 0, got {args.limit}")
    return args


@dataclass
class Item:
    id: int
    tokens: np.ndarray
    labels: np.ndarray
    source: str


@dataclass
class _Readers:
    shards: dict[Path, ShardReader] = field(default_factory=dict)

    def load(self, rec: Record, base: Path) -> Item:
        path = Path(rec.file)
        path = path if path.is_absolute() else base / path
        if rec.offset is None:
            tokens, labels = load_lumina_item(path)
            return Item(rec.id, tokens, labels, str(path))
        if path not in self.shards:
            self.shards[path] = ShardReader(path)
        tokens, labels = self.shards[path].read(rec.offset, rec.len)
        return Item(rec.id, tokens, labels, f"{path.name}@{rec.offset}")


def iter_items(args: InspectArgs) -> Iterator[Item]:
    path = args.record
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such record file")
    wanted = None if args.ids is None else set(args.ids)
    shown = 0
    if path.suffix == ".pkl":  # Lumina names them {id}.pkl
        tokens, labels = load_lumina_item(path)
        yield Item(int(path.stem) if path.stem.isdigit() else -1, tokens, labels, str(path))
        return
    readers = _Readers()
    for rec in iter_record_file(path):
        if wanted is not None and rec.id not in wanted:
            continue
        yield readers.load(rec, path.parent)
        shown += 1
        if args.limit and shown >= args.limit:
            return
        if wanted is not None:
            wanted.discard(rec.id)
            if not wanted:
                return
    if wanted:
        logger.warning("ids not found in %s: %s", path, sorted(wanted)[:20])


def find_tokenizer_dir(args: InspectArgs) -> Path:
    """--tokenizer_dir, else the bundle named in a *-run.json beside the record or beside its shards."""
    if args.tokenizer_dir is not None:
        return args.tokenizer_dir
    dirs = [args.record.parent]
    if args.record.suffix in (".json", ".jsonl"):
        try:
            first = next(iter_record_file(args.record), None)
        except RecordFormatError:
            first = None
        if first is not None:
            dirs.append((args.record.parent / first.file).parent)
    for run in (r for d in dirs for r in sorted(d.glob("*-run.json"))):
        try:
            d = json.loads(run.read_text(encoding="utf-8")).get("tokenizer_dir")
        except (json.JSONDecodeError, OSError):
            continue
        if d and Path(d).is_dir():
            logger.info("using the tokenizer bundle %s named in %s", d, run)
            return Path(d)
    raise SystemExit("inspect_record: the text view and --render need the tokenizer bundle used for "
                     "pre-tokenization: pass --tokenizer_dir (or --json for raw ids)")


def segments(tok, tokens: np.ndarray, labels: np.ndarray) -> Iterator[tuple[str, int, int, bool]]:
    """("text"|"image", start, end, labelled) spans covering the item; text spans split where the
    label mask changes, image blocks whole."""
    trained = labels != IGNORE_INDEX
    blocks = tok.find_image_blocks(tokens)
    pos = 0
    for s, e in blocks + [(len(tokens), len(tokens))]:
        while pos < s:
            end = pos + 1
            while end < s and trained[end] == trained[pos]:
                end += 1
            yield "text", pos, end, bool(trained[pos])
            pos = end
        if s < e:
            yield "image", s, e, bool(trained[s:e].all())
        pos = e


def _mark(text: str, color: bool) -> str:
    return f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"


def text_view(tok, item: Item, color: bool, render_dir: Path | None) -> str:
    tokens, labels = item.tokens, item.labels
    parts: list[tuple[bool, list[str]]] = []
    k = 0
    for kind, s, e, trained in segments(tok, tokens, labels):
        if kind == "text":
            piece = tok.decode_text(tokens[s:e].tolist())
        else:
            try:
                codes = tok.parse_image_block(tokens[s:e])
                piece = f"[image {codes.shape[0] * 16}x{codes.shape[1] * 16}]"
                if render_dir is not None:
                    out = render_dir / f"{item.id}_{k}.png"
                    save_png(tok, codes, out)
                    piece = piece[:-1] + f" -> {out}]"
            except ValueError as err:
                piece = f"[image block, unreadable: {err}]"
            k += 1
        if parts and parts[-1][0] == trained:  # one mark around adjacent labelled text and images
            parts[-1][1].append(piece)
        else:
            parts.append((trained, [piece]))
    text = "".join(_mark("".join(p), color) if t else "".join(p) for t, p in parts)
    n_trained = int((labels != IGNORE_INDEX).sum())
    bad = int(((labels != IGNORE_INDEX) & (labels != tokens)).sum())
    head = (f"### id {item.id} · {len(tokens)} tokens · {n_trained} labelled · {k} image(s) · {item.source}"
            + (f" · WARNING: {bad} labels differ from their tokens" if bad else ""))
    return head + "\n" + text + "\n"


def save_png(tok, codes: np.ndarray, out: Path) -> None:
    from PIL import Image

    pixels = tok.decode_codes(codes).numpy()  # [3, H, W] in [-1, 1]
    arr = np.clip(np.round((pixels.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        tok = None
        if not args.json or args.render is not None:
            from model.tokenizer.bundle import ChameleonTokenizer

            tok = ChameleonTokenizer.from_bundle(find_tokenizer_dir(args), device=args.device,
                                                 load_vqgan=args.render is not None)
        color = sys.stdout.isatty()
        for item in iter_items(args):
            if args.json:
                sys.stdout.write(json.dumps({"id": item.id, "len": int(len(item.tokens)),
                                             "token": item.tokens.tolist(), "label": item.labels.tolist()}) + "\n")
                if args.render is not None:
                    text_view(tok, item, False, args.render)
            else:
                sys.stdout.write(text_view(tok, item, color, args.render))
        sys.stdout.flush()
    except UnsafePickleError as e:
        logger.error("refused: %s", e)
        return 2
    except BrokenPipeError:  # e.g. `| head`
        sys.stderr.close()
        return 0
    except (RecordFormatError, pickle.UnpicklingError, ValueError, OSError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

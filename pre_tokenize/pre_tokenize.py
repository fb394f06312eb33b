r"""Pre-tokenizes conversations with images into token shards: one rank of S, exactly once, resumable.

    # one process (rank 0 of 1) on a CPU with the tiny bundle:
    python model/make_tiny_bundle.py --out /tmp/tiny_bundle
    python pre_tokenize/pre_tokenize.py --in_filename data.json --out_dir out --target_size 256 \
        --tokenizer_dir /tmp/tiny_bundle --device cpu
    # 8 GPUs, Lumina's way (one rank per GPU), then merge:
    for i in {0..7}; do CUDA_VISIBLE_DEVICES=$i python -u pre_tokenize/pre_tokenize.py --splits 8 --rank $i \
        --in_filename data.jsonl --out_dir out --target_size 768 --tokenizer_dir ckpts/chameleon/tokenizer \
        &> $i.log & done; wait
    python pre_tokenize/concat_record.py --sub_record_dir out --save_path out/record.json
    # SLURM: --rank/--splits come from SLURM_PROCID/SLURM_NTASKS (or torchrun's RANK/WORLD_SIZE)
    srun -n 8 --gres=gpu:8 python pre_tokenize/pre_tokenize.py --in_filename data.jsonl --out_dir out ...
    # video conversations (AuroraCap / LLaVA-video: "video": "clips/a.mp4", <video> markers), 8 frames each:
    python pre_tokenize/pre_tokenize.py --in_filename videos.jsonl --out_dir out_v --target_size 512 \
        --video_frames 8 --video_target_size 256
    # a Megatron-Energon prepared dataset (LLaVA-JP), its train split, whole images padded instead of cropped:
    python pre_tokenize/pre_tokenize.py --in_filename /data/energon --energon_split train \
        --out_dir out_e --target_size 512 --image_fit pad
    # Hugging Face data: Hub parquet shards (images embedded), or a save_to_disk folder's validation split:
    python pre_tokenize/pre_tokenize.py --in_filename LLaVA-OneVision-Data/data --out_dir out_p --target_size 512
    python pre_tokenize/pre_tokenize.py --in_filename my_set --hf_split validation --out_dir out_h \
        --field_map conversations=dialog,image=jpg

Rank r of S takes ids [r*ceil(N/S), (r+1)*ceil(N/S)) of the N input items (Lumina JSON list, JSONL
streamed, LLaVA JSON, a directory of webdataset tars, an energon-prepared dataset, Hugging Face parquet
shards or a save_to_disk folder; see data/inputs/dispatch.py; videos: data/inputs/video.py) and writes, in
``--out_dir``: ``{r}-of-{S}-tokens.bin`` (token shard), ``{r}-of-{S}-record.jsonl`` (one record per
item, in id order), ``{r}-of-{S}-errors.jsonl`` (one line per rejected item with the reason),
``{r}-of-{S}-run.json`` and, when the rank is complete, ``{r}-of-{S}-done.json``.

How it runs: ``--num_workers`` processes load and preprocess images and encode the text
(``ItemProcessor.prepare``), while this process encodes the images on ``--device`` with the VQGAN in
batches of up to ``--batch_size`` same-size images (gathered across consecutive items), assembles each
item's tokens and labels and appends them in id order. Killed at any moment (even kill -9), the same
command continues where it stopped and the files come out byte-identical to an uninterrupted run (see
data/pretok_writer.py); a finished rank is not redone. The output does not depend on --batch_size or
--num_workers, and is the same per id for any --splits. A bad item never stops the run: it goes to
the errors file. A bad input file stops it at once (exit 2). An exception that is not bad input (a bug)
stops it with the item and the traceback (exit 1), nothing marked done; after the fix the same command
continues at that item. Too many rejections (--max_error_rate, --max_consecutive_errors) stop it with the
most common reasons (exit 3); see data/pretok_errors.py.

SIGTERM or SIGINT (Ctrl-C; scancel; a preemption) stops the rank after the item in hand: everything written
so far is committed, a line says where it stopped and that the same command continues, and the exit status is
75 (the trainer's "stopped, re-run me"); a second signal exits at once (76), which is safe too (as a kill -9).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.image_preprocess import FITS
from data.inputs.dispatch import FORMATS, open_input
from data.inputs.item import InputFileError, rank_range
from data.pretok_errors import (MIN_ITEMS_FOR_RATE, FailureTolerance, PreTokenizeBug, TooManyErrors, classify,
                                is_bad_input)
from data.pretok_workers import Prepared, prepare_stream
from data.pretok_writer import (RUN_OPTIONAL_KEYS, OutputConflictError, OutputWriteError, RankWriter,
                                bundle_fingerprint)
from data.stop_signals import EXIT_STOPPED, StopSignals

logger = logging.getLogger("pre_tokenize")
# Lumina-mGPT's pre_tokenize.py has no --tokenizer_dir: it reads the bundle from here (relative to the cwd).
LUMINA_TOKENIZER_DIR = Path("./ckpts/chameleon/tokenizer")


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return None


def _arg(help: str, default=MISSING, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PretokArgs:
    """Flags of pre_tokenize.py (each field is one ``--flag``; ``None`` means "work it out")."""

    in_filename: Path = _arg("input: a Lumina JSON list (.json), JSONL with one item per line (.jsonl, "
                             "streamed), a LLaVA JSON list, a directory of webdataset .tar shards, a "
                             "Megatron-Energon prepared dataset (a directory with .nv-meta/), Hugging Face parquet "
                             "shards (a .parquet file, a glob, or a directory such as a Hub repo's data/) or a "
                             "datasets save_to_disk folder. Items may have \"video\" (see --video_frames)")
    out_dir: Path = _arg("output directory for the rank's shard, record, errors and marker files")
    tokenizer_dir: Path | None = _arg("tokenizer bundle: text_tokenizer.json, vqgan.yaml, vqgan.ckpt (Meta's "
                                      "Chameleon release, or `python model/make_tiny_bundle.py --out DIR`). "
                                      f"Default: {LUMINA_TOKENIZER_DIR} (where Lumina-mGPT keeps it) when that "
                                      "directory exists", None)
    splits: int | None = _arg("number of ranks the input is split into (default: $SLURM_NTASKS, else "
                              "$WORLD_SIZE, else 1)", None)
    rank: int | None = _arg("this process's rank in [0, splits) (default: $SLURM_PROCID, else $RANK, "
                            "else 0)", None)
    target_size: int = _arg("image area budget: crops are chosen on a 32-px grid with at most "
                            "(target_size/32)^2 patches, e.g. 512 -> 512x512, 384x672, ... (default: %(default)s)", 512)
    in_format: str = _arg(f"input format, one of {', '.join(FORMATS)}; auto: a directory with .nv-meta/ -> "
                          f"energon (prepared by `energon prepare`), another directory -> wds, .jsonl -> "
                          f"jsonl, .json -> json (llava when its messages use <image> markers); a directory with "
                          f"state.json or dataset_dict.json -> hf (save_to_disk); .parquet, a glob, or a directory "
                          f"of parquet files without .tar shards -> parquet", "auto",
                          choices=FORMATS)
    image_fit: str = _arg("how an image meets its chosen 32-px grid size: crop (Lumina's: cover it, cut the "
                          "centre) or pad (keep the whole image: fit inside, pad with LLaVA's mean colour, as "
                          "LLaVA's expand2square / xtuner's pad_image_to_square). Applies to video frames too "
                          "(default: %(default)s)", "crop", choices=FITS)
    video_frames: int = _arg("frames per video, chosen uniformly over its duration (np.linspace(0, n-1, K)); "
                             "a video with fewer frames is rejected (default: %(default)s)", 8)
    video_fps: float | None = _arg("instead of --video_frames: frames at this rate (frames per second of "
                                   "the clip), at most --video_max_frames, spread evenly when there would "
                                   "be more (default: off)", None)
    video_max_frames: int = _arg("cap on the frames per video with --video_fps (default: %(default)s)", 32)
    video_target_size: int = _arg("area budget of each video frame, like --target_size for images "
                                  "(default: %(default)s)", 256)
    energon_split: str = _arg("with --in_format energon: the split of .nv-meta/split.yaml to read "
                              "(default: %(default)s)", "train")
    hf_split: str = _arg("with --in_format parquet or hf: the split to read: the DatasetDict's split of a "
                         "save_to_disk folder, or, in a directory of parquet files, those named {split}-NNNNN-of-"
                         "NNNNN.parquet or under a folder {split}/ (default: %(default)s)", "train")
    field_map: str | None = _arg("with --in_format parquet or hf: FIELD=COLUMN pairs, comma-separated, for "
                                 "tables whose columns have other names, e.g. conversations=dialog,image=jpg. "
                                 "Fields: conversations (from/value messages), messages (role/content), image, "
                                 "images, video, videos, and the message keys from, value, role, content "
                                 "(default: the columns named so)", None)
    image_root: Path | None = _arg("directory that relative image and video paths are resolved against (default: "
                                   "the directory of --in_filename)", None)
    batch_size: int = _arg("most same-size images the VQGAN encodes in one call (default: %(default)s)", 8)
    num_workers: int = _arg("worker processes that load/preprocess images and encode text (0: do it in "
                            "this process; a crashing decoder then stops the run; default: %(default)s)", 2)
    device: str = _arg("device of the VQGAN encoder: auto (cuda:$LOCAL_RANK or $SLURM_LOCALID when CUDA "
                       "is available, else cpu), cpu, cuda, cuda:1, ...", "auto")
    batch_invariant: bool | None = _arg(
        "encode the images of a batch one at a time, so codes never depend on which images share a batch "
        "(bit-exact output for any --batch_size). Default: on for CPU, where convolution results change "
        "in the last bits with the batch size and batching gains little; off for CUDA, where batching is "
        "the speed-up", None, pair="no_batch_invariant")
    vq_channels_last: bool = _arg(
        "run the VQGAN in channels_last layout (on CPU with model/tokenizer/vqgan_fast.py's fast path): faster "
        "on a real-size VQGAN, but some codes differ from Lumina's NCHW encoder (tests/test_lumina_golden.py); "
        "default off: Lumina's codes", False, pair="no_vq_channels_last")
    threads: int = _arg("torch intra-op threads for the VQGAN on CPU (0: torch's default, one per core). On a "
                        "machine shared with other jobs, fewer threads than cores avoids stalls", 0)
    reuse_freed_memory: bool | None = _arg(
        "let the process keep freed memory for its next allocations (glibc mallopt) instead of returning it "
        "to the kernel: on CPU the VQGAN's large activations otherwise cost a page fault per 4 KB on every "
        "op, about a sixth of the encode time; the process then keeps its peak memory. Default: on for a "
        "CPU device", None, pair="no_reuse_freed_memory")
    max_error_rate: float = _arg(f"stop (exit 3) when more than this share of the run's items is rejected, judged "
                                 f"once {MIN_ITEMS_FOR_RATE} items are done: so many rejections mean a wrong "
                                 f"setting (--image_root, the input format), not bad data. 1: never "
                                 f"(default: %(default)s)", 0.5)
    max_consecutive_errors: int = _arg("stop (exit 3) when more than this many items in a row are rejected. 0: never "
                                       "(default: %(default)s)", 100)
    commit_items: int = _arg("make the output durable (fsync) at least every this many items (default: %(default)s)", 256)
    commit_seconds: float = _arg("... and at least every this many seconds (default: %(default)s)", 5.0)
    progress: bool = _arg("show a tqdm progress bar on stderr", True, pair="no_progress")

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in fields(cls):
            meta = f.metadata
            if "pair" in meta:
                g = p.add_mutually_exclusive_group()
                g.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default,
                               help=meta["help"])
                g.add_argument(f"--{meta['pair']}", dest=f.name, action="store_false",
                               help=f"the opposite of --{f.name}")
                continue
            typ = {"Path": Path, "Path | None": Path, "int": int, "int | None": int, "float": float,
                   "float | None": float, "str": str, "str | None": str}[f.type]
            kw = {"required": True} if f.default is MISSING else {"default": f.default}
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            p.add_argument(f"--{f.name}", type=typ, help=meta["help"], **kw)
        return p

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> "PretokArgs":
        p = cls.parser()
        args = cls(**vars(p.parse_args(argv)))
        if args.splits is None:
            args.splits = _env_int("SLURM_NTASKS", "WORLD_SIZE") or 1
        if args.rank is None:
            args.rank = _env_int("SLURM_PROCID", "RANK") or 0
        if args.tokenizer_dir is None:
            if not LUMINA_TOKENIZER_DIR.is_dir():
                p.error(f"no --tokenizer_dir given, and Lumina's default {LUMINA_TOKENIZER_DIR} does not exist "
                        f"(relative to {Path.cwd()}): pass --tokenizer_dir DIR (a Chameleon tokenizer bundle, "
                        f"or `python model/make_tiny_bundle.py --out DIR`)")
            args.tokenizer_dir = LUMINA_TOKENIZER_DIR
        checks = [(args.splits >= 1, f"--splits must be >= 1, got {args.splits}"),
                  (0 <= args.rank < args.splits, f"--rank must be in [0, --splits={args.splits}), got {args.rank}"),
                  (args.target_size >= 32 and args.target_size % 32 == 0,
                   f"--target_size must be a positive multiple of 32, got {args.target_size}"),
                  (args.video_target_size >= 32 and args.video_target_size % 32 == 0,
                   f"--video_target_size must be a positive multiple of 32, got {args.video_target_size}"),
                  (args.video_frames >= 1, f"--video_frames must be >= 1, got {args.video_frames}"),
                  (args.video_fps is None or args.video_fps > 0, f"--video_fps must be > 0, got {args.video_fps}"),
                  (args.video_max_frames >= 1, f"--video_max_frames must be >= 1, got {args.video_max_frames}"),
                  (args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}"),
                  (args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}"),
                  (args.threads >= 0, f"--threads must be >= 0, got {args.threads}"),
                  (args.commit_items >= 1, f"--commit_items must be >= 1, got {args.commit_items}"),
                  (0 <= args.max_error_rate <= 1, f"--max_error_rate must be in [0, 1], got {args.max_error_rate}"),
                  (args.max_consecutive_errors >= 0,
                   f"--max_consecutive_errors must be >= 0, got {args.max_consecutive_errors}")]
        for ok, msg in checks:
            if not ok:
                p.error(msg)
        return args


def video_sampling(args: PretokArgs):
    from data.inputs.video import VideoSampling

    return VideoSampling(frames=args.video_frames, fps=args.video_fps, max_frames=args.video_max_frames,
                         target_size=args.video_target_size)


def output_settings(args: PretokArgs) -> dict:
    """The flags beyond Lumina's that change the output, where not at their defaults (for run.json and
    done.json; a re-run with other values is refused)."""
    return {k: getattr(args, k) for k in RUN_OPTIONAL_KEYS
            if hasattr(args, k) and getattr(args, k) != PretokArgs.__dataclass_fields__[k].default}


def resolve_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    return torch.device(f"cuda:{local % torch.cuda.device_count()}")


@dataclass
class _Entry:
    """An item waiting, in id order, for its images' codes."""

    p: Prepared
    codes: list
    missing: int


class ImageBatcher:
    """Keeps prepared items in id order until all their images are encoded.

    Same-size images of consecutive items share a VQGAN call: a size group is encoded once it holds
    ``batch_size`` images, or, when too much waits (``max_images`` images or ``max_items`` items), the
    group of the oldest waiting image is encoded as it is. ``ready()`` hands out the finished head.
    """

    def __init__(self, vqgan, batch_size: int, per_image: bool, max_images: int, max_items: int):
        self.vqgan, self.batch_size, self.per_image = vqgan, batch_size, per_image
        self.max_images, self.max_items = max_images, max_items
        self.entries: deque[_Entry] = deque()
        self.groups: dict[tuple, deque[tuple[_Entry, int]]] = {}
        self.waiting = 0
        self.images_done = 0
        self.encode_seconds = 0.0

    def push(self, p: Prepared) -> None:
        images = [] if p.error is not None else list(p.prepared.images)
        e = _Entry(p, [None] * len(images), len(images))
        self.entries.append(e)
        for k, img in enumerate(images):
            self.groups.setdefault(tuple(img.shape), deque()).append((e, k))
        self.waiting += len(images)
        for shape in [s for s, g in self.groups.items() if len(g) >= self.batch_size]:
            while len(self.groups.get(shape, ())) >= self.batch_size:
                self._encode(shape)
        while self.waiting and (self.waiting > self.max_images or len(self.entries) > self.max_items):
            self._encode_oldest()

    def _encode_oldest(self) -> None:
        head = next(e for e in self.entries if e.missing)
        k = next(k for k, c in enumerate(head.codes) if c is None)
        self._encode(tuple(head.p.prepared.images[k].shape))

    def _encode(self, shape: tuple) -> None:
        import torch

        group = self.groups[shape]
        batch = [group.popleft() for _ in range(min(self.batch_size, len(group)))]
        if not group:
            del self.groups[shape]
        t0 = time.perf_counter()
        x = torch.from_numpy(np.stack([e.p.prepared.images[k] for e, k in batch]))
        if self.per_image:
            codes = [self.vqgan.encode(x[i:i + 1])[0].cpu().numpy() for i in range(len(batch))]
        else:
            codes = list(self.vqgan.encode(x).cpu().numpy())
        self.encode_seconds += time.perf_counter() - t0
        for (e, k), c in zip(batch, codes):
            e.codes[k] = c
            e.missing -= 1
        self.waiting -= len(batch)
        self.images_done += len(batch)

    def ready(self, flush: bool = False) -> list[_Entry]:
        if flush:
            while self.waiting:
                self._encode_oldest()
        out = []
        while self.entries and not self.entries[0].missing:
            out.append(self.entries.popleft())
        return out


def write_entry(writer: RankWriter, processor, e: _Entry, counts: Counter, tolerance: FailureTolerance) -> None:
    """Appends an item (or its rejection); PreTokenizeBug for an exception that is not bad input,
    TooManyErrors beyond the failure tolerance."""
    p = e.p
    if p.error is None:
        try:
            tokens, labels = processor.assemble(p.prepared, e.codes)
        except Exception as exc:
            if not is_bad_input(exc):
                raise PreTokenizeBug(p.item.where, p.item.id, "assembling", traceback.format_exc()) from exc
            p.error, p.reason = f"{p.item.where}: {exc}", classify(exc)
        else:
            frames = p.prepared.video_frames
            writer.add(p.item.id, tokens, labels, {"frames": frames} if frames else None)
            counts["records"] += 1
            counts["tokens"] += len(tokens)
            counts["videos"] += len(frames)
            counts["frames"] += sum(frames)
            tolerance.add(p.item.where, None, None)
            return
    writer.add_error(p.item.id, p.error, p.reason)
    counts[f"error:{p.reason}"] += 1
    tolerance.add(p.item.where, p.error, p.reason)


def run(args: PretokArgs) -> dict:
    """Pre-tokenizes rank ``args.rank`` of ``args.splits``; returns the rank's summary."""
    t_start = time.perf_counter()
    tag = f"rank {args.rank} of {args.splits}"
    from data.item_processor import ItemProcessor
    from model.tokenizer.bundle import ChameleonTokenizer
    from model.tokenizer.vqgan_fast import reuse_freed_memory

    source = open_input(args.in_filename, args.in_format, args.energon_split, args.hf_split, args.field_map)
    if args.image_root is not None and not args.image_root.is_dir():
        raise InputFileError(f"--image_root {args.image_root}: not a directory")
    tokenizer = ChameleonTokenizer.from_bundle(args.tokenizer_dir, load_vqgan=False)  # checks the bundle
    ids = rank_range(len(source), args.rank, args.splits)
    run_info = {"num_items": len(source), "in_format": source.format, "target_size": args.target_size,
                "tokenizer_sha256": bundle_fingerprint(args.tokenizer_dir),
                "in_filename": str(args.in_filename.resolve()), "tokenizer_dir": str(args.tokenizer_dir.resolve()),
                "image_root": None if args.image_root is None else str(args.image_root.resolve()),
                **output_settings(args)}
    with RankWriter.open(args.out_dir, args.rank, args.splits, ids, run_info) as writer:
        if writer.finished:
            logger.info("%s: already finished (%s exists); nothing to do", tag,
                        args.out_dir / f"{args.rank}-of-{args.splits}-done.json")
            return {"already_finished": True}
        st = writer.state
        todo = (ids.stop - st.next_id) - len(st.skip)
        logger.info("%s: ids [%d, %d) of %d (%s input %s)%s", tag, ids.start, ids.stop, len(source),
                    source.format, args.in_filename,
                    f"; resuming at id {st.next_id}, {st.num_records} records and {st.num_errors} errors "
                    f"kept" + (", a torn last line dropped" if st.torn else "") if st.next_id > ids.start else "")

        processor = ItemProcessor(tokenizer, args.target_size, args.image_fit, video_sampling(args))
        base_dir = args.image_root if args.image_root is not None else source.base_dir
        items = (it for it in source.iter_items(range(st.next_id, ids.stop)) if it.id not in st.skip)
        # installed before the worker pool forks: the workers inherit the handler, which ignores it in them
        stop = StopSignals([signal.SIGTERM, signal.SIGINT])
        if threading.current_thread() is threading.main_thread():
            stop.install()
        # The worker pool forks here, before the VQGAN is loaded and torch starts its thread pools.
        stream = prepare_stream(processor, items, base_dir, args.num_workers)
        bar = None
        try:
            device = resolve_device(args.device)
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            if args.reuse_freed_memory if args.reuse_freed_memory is not None else device.type == "cpu":
                reuse_freed_memory()
            full = ChameleonTokenizer.from_bundle(args.tokenizer_dir, device=device,
                                                  channels_last=args.vq_channels_last)
            per_image = args.batch_invariant if args.batch_invariant is not None else device.type == "cpu"
            batcher = ImageBatcher(full.vqgan, args.batch_size, per_image, max_images=4 * args.batch_size,
                                   max_items=max(256, 8 * args.batch_size))
            logger.info("%s: VQGAN on %s, batches of up to %d same-size images%s, %d worker process(es)", tag,
                        device, args.batch_size, " (encoded one by one: batch-invariant)" if per_image else "",
                        args.num_workers)

            counts: Counter = Counter()
            tolerance = FailureTolerance(args.max_error_rate, args.max_consecutive_errors, hint=(
                f"--image_root (relative image and video paths now resolve against {base_dir}) and the input "
                f"format (--in_format {args.in_format}: read as {source.format})"))
            bar = tqdm(total=todo, unit="item", dynamic_ncols=True, disable=not args.progress, desc=tag)
            t_first, last_commit = None, time.perf_counter()
            for p in stream:
                t_first = t_first or time.perf_counter()
                if p.bug is not None:  # everything before the item is written; then the run stops
                    for e in batcher.ready(flush=True):
                        write_entry(writer, processor, e, counts, tolerance)
                    raise PreTokenizeBug(p.item.where, p.item.id, "preparing", p.bug)
                batcher.push(p)
                for e in batcher.ready():
                    write_entry(writer, processor, e, counts, tolerance)
                    bar.update(1)
                if stop.requested:  # after the item in hand; prepared items not yet encoded are redone
                    break
                now = time.perf_counter()
                if writer.uncommitted >= args.commit_items or now - last_commit >= args.commit_seconds:
                    writer.commit()
                    last_commit = now
                    bar.set_postfix(images=batcher.images_done, errors=sum(v for k, v in counts.items()
                                                                         if k.startswith("error:")))
            if stop.requested:
                writer.commit()
                return _stopped(args, tag, stop.requested, writer, counts)
            for e in batcher.ready(flush=True):
                write_entry(writer, processor, e, counts, tolerance)
                bar.update(1)
            summary = writer.finish()
        except PreTokenizeBug:
            writer.commit()  # the items before the bug are good: keep them (nothing is marked done)
            raise
        except TooManyErrors:
            n = writer.discard_this_run()  # a wrong setting: the fixed re-run redoes these items
            logger.info("%s: the %d items of this run were discarded (%d rejected)", tag, n,
                        sum(v for k, v in counts.items() if k.startswith("error:")))
            raise
        finally:
            stream.close()
            stop.restore()
            if bar is not None:
                bar.close()
    t_end = time.perf_counter()
    steady = t_end - (t_first or t_end)
    images_per_s = batcher.images_done / steady if steady > 0 else 0.0
    rejected = {k[len("error:"):]: v for k, v in counts.items() if k.startswith("error:")}
    videos = (f" ({counts['frames']} of them frames of {counts['videos']} videos)" if counts["videos"] else "")
    settings = "".join(f", {k} {v}" for k, v in output_settings(args).items())
    logger.info("%s done%s. This run: %d records, %d rejected%s, %d tokens; %d images%s in %.1f s = %.2f images/s "
                "(VQGAN busy %.1f s; start-up %.1f s not counted). Rank total: %d records, %d rejected%s, "
                "%d tokens; errors in %s", tag, settings, counts["records"], sum(rejected.values()),
                _by_reason(rejected), counts["tokens"], batcher.images_done, videos, steady, images_per_s, batcher.encode_seconds,
                (t_first or t_end) - t_start, summary["records"], summary["errors"],
                _by_reason(summary["errors_by_reason"]), summary["tokens"],
                args.out_dir / f"{args.rank}-of-{args.splits}-errors.jsonl")
    return {**summary, "images": batcher.images_done, "images_per_s": images_per_s, "seconds": t_end - t_start}


def _stopped(args: PretokArgs, tag: str, signame: str, writer: RankWriter, counts: Counter) -> dict:
    """The summary of a rank stopped by a signal (everything written so far is committed)."""
    last = writer.last_id
    logger.warning("%s: stopped by %s after id %s (%d records and %d rejected items this run, all written and "
                   "synced); re-run the same command to continue at id %d (exit status %d)", tag, signame,
                   last if last is not None else "none", counts["records"],
                   sum(v for k, v in counts.items() if k.startswith("error:")),
                   (last + 1) if last is not None else writer.state.next_id, EXIT_STOPPED)
    return {"stopped": signame, "last_id": last}


def _by_reason(counts: dict) -> str:
    return " (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")" if counts else ""


def main(argv: list[str] | None = None) -> int:
    args = PretokArgs.parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [{args.rank}/{args.splits}] %(levelname)s %(message)s")
    from model.tokenizer.vqgan import BundleError

    try:
        summary = run(args)
    except (InputFileError, OutputConflictError, OutputWriteError, BundleError) as e:
        logger.error("%s", e)
        return 2
    except TooManyErrors as e:
        logger.error("%s", e)
        return 3
    except PreTokenizeBug as e:
        logger.error("%s", e)
        return 1
    return EXIT_STOPPED if summary.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())

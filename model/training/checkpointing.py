"""Resumable training checkpoints (sharded, atomic) and HF-format export.

Layout (format ``lumina-stack-train-ckpt`` version 1), one directory per checkpoint:

    {output_dir}/epoch{E}-iter{I}/   within epoch E, after I optimizer steps of it
    {output_dir}/epoch{E}/           after the whole of epoch E
        .metadata, __*_*.distcp      torch.distributed.checkpoint (DCP): {"model": ..., "optim": ...},
                                     every rank writes its own shards; loads on any world size
        rng/rank{r:05d}.pt           per rank: python, numpy, torch (and CUDA) RNG states
                                     (torch.save of plain tensors/ints, read with weights_only=True)
        trainer_state.json           {"format", "version", "epoch", "iter", "global_step", "epoch_done",
                                      "sampler": {"epoch", "step"}, "world_size", "global_batch_size",
                                      "steps_per_epoch"}; with --only_save_trainable also
                                     "base_model": {"path", "fingerprint"} (model/training/trainable.py)
        args.json                    the trainer's flags
        config.json                  the model's transformers config
        hf/                          (epoch ends, unless --no_export_hf) ChameleonForConditionalGeneration
                                     save_pretrained output, safetensors
        lumina/                      (epoch ends, with --export_layout lumina|both) Lumina-mGPT's layout
                                     (model/lumina_layout.py)
        hf/adapter/                  (LoRA runs) the peft adapter: adapter_model.safetensors, adapter_config.json
        COMPLETE                     written last

Atomicity: everything is written into ``{output_dir}/.tmp-{name}/``; after all ranks are done (barrier),
rank 0 writes ``COMPLETE``, fsyncs, and renames the directory to its final name. Resume only considers
directories named ``epoch{E}[-iter{I}]`` that contain ``COMPLETE``, so a crash (or SIGKILL) at any moment of a
save leaves the previous checkpoint as the newest usable one; the stale ``.tmp-*`` is removed by the next
run. Saving a name that exists (a run restarted from an older checkpoint) moves the old copy to
``.tmp-old-{name}`` before the new one is renamed in; a crash between the two renames is repaired by the next
run (``recover_interrupted_saves``: the complete new copy, else the old one, gets the name back), so the only
complete copy of a name survives a crash at any point of the save. ``--ckpt_max_keep N`` keeps the N newest
complete checkpoints (<= 0: all). The output directory must be on a file system all ranks share.

Damage after the save (a truncated copy, a lost shard file): ``latest_usable_checkpoint`` checks the newest
complete checkpoint (``verify_checkpoint``: every DCP file as long as its ``.metadata`` says, the RNG files
readable) and falls back, with a warning, to the previous one when it is damaged.

No code from a checkpoint is ever run. DCP itself unpickles ``.metadata`` with plain ``pickle.load`` and
non-tensor entries with ``torch.load(weights_only=False)``; ``load_dcp_state`` gives DCP a reader that reads
``.metadata`` once and unpickles those bytes with an unpickler that admits only DCP's metadata classes (the
bytes checked are the bytes loaded), and checks the non-tensor entries with ``weights_only=True`` first. A
checkpoint that needs anything else is refused with ``UnsafeCheckpointError`` (never skipped silently:
someone put it there).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from data.files import fsync_dir
from model.qk_norm import regroup_state_dict

logger = logging.getLogger(__name__)

FORMAT = "lumina-stack-train-ckpt"
VERSION = 1
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = f"{TMP_PREFIX}old-"  # the previous copy of a name being saved again, until the new one is in
NAME_RE = re.compile(r"^epoch(\d+)(?:-iter(\d+))?$")

# indirection so a test can interrupt a save at a chosen point (see tests/test_trainer.py)
dcp_save = dcp.save
# The points of a save, in order (from "marker_written" on: rank 0's renames); tests/test_checkpointing.py
# sets ``_on_save_step`` to kill a save at each of them.
SAVE_STEPS = ("tmp_created", "shards_written", "marker_written", "old_moved_aside", "new_moved_in", "dir_synced",
              "old_unmarked", "old_removed")
_on_save_step: Callable[[str], None] | None = None


def _save_step(step: str) -> None:
    if _on_save_step is not None:
        _on_save_step(step)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, wrong format, other global batch); names the path."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code when loaded (a pickled callable); it is refused, not loaded."""


def ckpt_name(epoch: int, iteration: int | None = None) -> str:
    return f"epoch{epoch}" if iteration is None else f"epoch{epoch}-iter{iteration}"


def sort_key(name: str) -> tuple[float, float]:
    """Order of checkpoints in time: epoch{E}-iter{I} by (E, I); epoch{E} after every epoch{E}-iter{I}."""
    m = NAME_RE.match(name)
    if not m:
        raise ValueError(f"not a checkpoint name: {name!r}")
    return int(m.group(1)), (math.inf if m.group(2) is None else int(m.group(2)))


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and NAME_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: sort_key(p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, max_keep: int) -> list[Path]:
    """Deletes all but the ``max_keep`` newest complete checkpoints (``max_keep <= 0``: keep all)."""
    if max_keep <= 0:
        return []
    doomed = complete_checkpoints(output_dir)[:-max_keep]
    for p in doomed:
        # make it invisible to resume first, so a crash mid-delete never leaves a half checkpoint "complete"
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
        logger.info("deleted old checkpoint %s (--ckpt_max_keep %d)", p, max_keep)
    return doomed


def recover_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Finishes or undoes a re-save of an existing name that a crash cut between its two renames (see
    ``save_checkpoint``): while ``{name}`` is absent (or incomplete), the complete copy among
    ``.tmp-{name}`` (the new one: the save is completed) and ``.tmp-old-{name}`` (the previous one) is
    renamed to ``{name}``, so ``remove_stale_tmp`` never deletes the only complete copy. Returns the
    checkpoints it put back. Rank 0 only, before anything else looks at the directory."""
    out = Path(output_dir)
    restored = []
    if not out.is_dir():
        return restored
    for old in sorted(out.glob(f"{OLD_PREFIX}*")):
        name = old.name[len(OLD_PREFIX):]
        final, new = out / name, out / f"{TMP_PREFIX}{name}"
        if not NAME_RE.match(name) or is_complete(final):
            continue  # the save got its new copy in place; the old one is removed with the other stale dirs
        src = new if is_complete(new) else old if is_complete(old) else None
        if src is None:
            continue
        if final.exists():  # incomplete, so never resumable (e.g. a delete cut short); it is in the way
            shutil.rmtree(final)
        os.rename(src, final)
        fsync_dir(out)
        logger.warning("checkpoint save of %s was interrupted between its renames; put back the %s copy from %s",
                       final, "new" if src == new else "previous", src.name)
        restored.append(final)
    return restored


def remove_stale_tmp(output_dir: str | Path) -> None:
    """Deletes what interrupted saves left (``.tmp-*``), after ``recover_interrupted_saves`` has put back any
    complete copy that is the only one of its name."""
    out = Path(output_dir)
    recover_interrupted_saves(out)
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                logger.warning("removing %s, left by an interrupted checkpoint save", p)
                (p / MARKER).unlink(missing_ok=True)  # a delete cut short must not leave it looking complete
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict:
    st = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_state_from_lists(obj):
    # json-free round trip: torch.save keeps tuples, but be tolerant of lists
    version, internal, gauss = obj
    return version, tuple(internal), gauss


def _load_weights_only(path: Path):
    """torch.load with weights_only=True; a file needing code is UnsafeCheckpointError, a damaged one
    CheckpointError (torch raises UnpicklingError, RuntimeError or EOFError without naming the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused: loading it would need more than tensors and plain data "
                                    f"(weights_only=True): {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from e


def load_rng(ckpt: Path, rank: int) -> dict | None:
    path = Path(ckpt) / "rng" / f"rank{rank:05d}.pt"
    if not path.is_file():
        return None
    state = _load_weights_only(path)
    try:
        state["python"] = _python_state_from_lists(state["python"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not an RNG state file ({type(e).__name__}: {e})") from e
    return state


# ----------------------------------------------------------------------------------------------------------
# reading DCP files without running code


# Every class DCP (torch 2.4 - 2.13) puts in a FileSystemWriter's .metadata; torch dtypes are admitted by type.
_DCP_METADATA_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.path}: refused: it names {module}.{name}, which is not part of a "
                                    f"torch.distributed.checkpoint metadata file (loading it could run code)")


def _unpickle_dcp_metadata(data: bytes, path: Path):
    try:
        return _DcpMetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from e


def read_dcp_metadata(ckpt: str | Path):
    """The DCP ``Metadata`` of a checkpoint, unpickled with only DCP's own metadata classes admitted."""
    path = Path(ckpt) / ".metadata"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from e
    return _unpickle_dcp_metadata(data, path)


class _CheckedMetadataReader(FileSystemReader):
    """DCP's file-system reader, except that ``.metadata`` is read once and those same bytes are unpickled
    with the restricted unpickler (DCP's own reader runs plain ``pickle.load`` on the file: checking it
    first and letting DCP read it again would load bytes nobody checked if the file changed in between)."""

    refused: "UnsafeCheckpointError | None" = None

    def read_metadata(self, *args, **kwargs):
        get_path = getattr(self, "_get_metadata_path", None)  # torch >= 2.6 (per-rank metadata files)
        path = get_path(kwargs.get("rank")) if get_path is not None else Path(self.path) / ".metadata"
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            metadata = _unpickle_dcp_metadata(data, Path(path))
        except UnsafeCheckpointError as e:
            self.refused = e  # DCP turns reader errors into an AssertionError; load_dcp_state re-raises this
            raise
        if hasattr(self, "load_id"):  # what FileSystemReader.read_metadata adds (torch >= 2.4)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with weights_only=False; check them with
    weights_only=True first (the same bytes then name only admitted classes), then let it load them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"entry {read_item.dest_index.fqn!r} of the checkpoint: refused: loading it "
                                        f"would need more than plain data: {str(e).splitlines()[0]}") from e
        value.seek(0)
        super().load_bytes(read_item, value)


def load_dcp_state(state: dict, ckpt: str | Path) -> None:
    """``dcp.load(state, checkpoint_id=ckpt)`` (in place; collective when a process group exists), refusing
    a checkpoint whose metadata or entries would run code."""
    ckpt = Path(ckpt)
    read_dcp_metadata(ckpt)  # a clear error for a missing or damaged file before DCP starts
    reader = _CheckedMetadataReader(str(ckpt))
    try:
        dcp.load(state, storage_reader=reader, planner=_WeightsOnlyLoadPlanner())
    except CheckpointException as e:  # DCP gathers every rank's failure into one (a BaseException)
        errors = [exc for exc, _ in e.failures.values()] + ([reader.refused] if reader.refused else [])
        unsafe = [x for x in errors if isinstance(x, UnsafeCheckpointError)]
        first = unsafe[0] if unsafe else errors[0] if errors else e
        raise (UnsafeCheckpointError if unsafe else CheckpointError)(
            f"{ckpt}: cannot be loaded on rank(s) {sorted(e.failures)}: {type(first).__name__}: {first}") from None
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{ckpt}: {e}") from e
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{ckpt}: cannot be loaded ({type(e).__name__}: {e})") from e


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Checks a complete checkpoint before it is loaded; returns its trainer state. CheckpointError if it is
    damaged: a DCP file missing or shorter than its metadata says (truncated copy), metadata or an RNG file
    unreadable; UnsafeCheckpointError if a file would run code. Reads only metadata: O(files), not O(bytes)."""
    ckpt = Path(ckpt)
    state = read_train_state(ckpt)
    need: dict[str, int] = {}
    for info in read_dcp_metadata(ckpt).storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, but the checkpoint's .metadata stores data in it")
        size = path.stat().st_size
        if size < n:
            raise CheckpointError(f"{path}: {size} bytes, but the checkpoint's .metadata needs {n} (truncated)")
    for path in sorted((ckpt / "rng").glob("rank*.pt")):
        _load_weights_only(path)
    return state


def latest_usable_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that passes ``verify_checkpoint``; a damaged newer one is skipped with
    a warning. None if there is no complete checkpoint; CheckpointError if there are some but none is usable
    (starting over silently would discard the run), UnsafeCheckpointError at once for a file with code."""
    found = complete_checkpoints(output_dir)
    problems = []
    for p in reversed(found):
        try:
            verify_checkpoint(p)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            logger.warning("checkpoint %s is damaged, falling back to the one before it: %s", p, e)
            problems.append(str(e))
            continue
        return p
    if found:
        raise CheckpointError(f"{output_dir}: none of the {len(found)} complete checkpoints is usable ("
                              + "; ".join(problems) + "); restore one, or start over with --no_auto_resume")
    return None


# ----------------------------------------------------------------------------------------------------------
# save / load


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(output_dir: str | Path, name: str, *, model, optimizer, train_state: dict, args: dict,
                    hf_config: dict, max_keep: int, export: Callable[[Path], None] | None = None,
                    model_keys: set[str] | None = None) -> Path:
    """Writes checkpoint ``name`` atomically (collective: every rank calls it). Returns its final path.
    ``model_keys``: save only these model tensors (--only_save_trainable; see model/training/trainable.py)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(output_dir)
    final, tmp = out / name, out / f"{TMP_PREFIX}{name}"
    t0 = time.time()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
        _save_step("tmp_created")
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    if model_keys is not None:
        msd = {k: v for k, v in msd.items() if k in model_keys}
    dcp_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    rng_path = tmp / "rng" / f"rank{rank:05d}.pt"
    torch.save(capture_rng(), rng_path)
    with open(rng_path, "rb+") as f:
        os.fsync(f.fileno())
    if export is not None:
        export(tmp / "hf")
    _save_step("shards_written")
    _barrier()
    if rank == 0:
        _write_json(tmp / "trainer_state.json", {"format": FORMAT, "version": VERSION, **train_state})
        _write_json(tmp / "args.json", args)
        _write_json(tmp / "config.json", hf_config)
        with open(tmp / MARKER, "w") as f:
            f.write(f"{FORMAT} {VERSION}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        _save_step("marker_written")
        # Re-saving a name (a run restarted from an older checkpoint): two renames, and a crash between them
        # leaves no {name}, the previous copy in .tmp-old-{name} and the new one in .tmp-{name}, both complete;
        # recover_interrupted_saves (run first by the next run) puts one of them back.
        old = out / f"{OLD_PREFIX}{name}"
        if final.exists():
            final.rename(old)
            _save_step("old_moved_aside")
        os.rename(tmp, final)
        _save_step("new_moved_in")
        fsync_dir(out)
        _save_step("dir_synced")
        if old.exists():
            (old / MARKER).unlink(missing_ok=True)  # a delete cut short must not leave it looking complete
            _save_step("old_unmarked")
            shutil.rmtree(old, ignore_errors=True)
            _save_step("old_removed")
        prune_checkpoints(out, max_keep)
        logger.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
    _barrier()
    return final


def read_train_state(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MARKER} file: the save was interrupted)")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/trainer_state.json: unreadable ({e})") from e
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{ckpt}: format {state.get('format')!r} version {state.get('version')!r}, "
                              f"expected {FORMAT!r} version {VERSION}")
    return state


def load_checkpoint(ckpt: str | Path, *, model, optimizer, model_keys: set[str] | None = None) -> dict:
    """Loads model and optimizer state (any world size; collective) and returns the trainer state.
    ``model_keys``: the checkpoint holds only these model tensors; the others keep their values."""
    state = read_train_state(ckpt)
    msd, osd = get_state_dict(model, optimizer)
    if model_keys is not None:
        msd = {k: v for k, v in msd.items() if k in model_keys}
    sd = {"model": msd, "optim": osd}
    load_dcp_state(sd, ckpt)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(strict=model_keys is None))
    logger.info("loaded checkpoint %s (epoch %d, iter %d, global step %d)", ckpt, state["epoch"],
                state["iter"], state["global_step"])
    return state


# ----------------------------------------------------------------------------------------------------------
# HF export


def gather_full_model_state(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state dict on CPU, on rank 0 only (collective; other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(full_sd: dict[str, torch.Tensor], config, out_dir: str | Path, *, dtype: torch.dtype,
            vq_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes ``ChameleonForConditionalGeneration.save_pretrained`` output (safetensors) from our weights.

    The VQ model, which training drops, is copied from ``vq_state_dict`` (keys ``model.vqmodel.*``, read from
    the --init_from checkpoint by ``read_vq_weights``). Without it the export holds no VQ model, as Lumina's
    7B releases do: never weights nobody trained or loaded. transformers then initialises the VQ model at
    load time (it warns about the missing ``model.vqmodel.*`` keys); token generation does not use it, and
    images are encoded and decoded with the tokenizer bundle's VQGAN. Grouped q/k norms ([groups,
    head_dim], see model/qk_norm.py) are written per head, each group's row repeated.
    """
    from transformers import ChameleonForConditionalGeneration
    from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

    out_dir = Path(out_dir)
    with torch.device("meta"):
        hf = ChameleonForConditionalGeneration(config)
    sd = {k: v.to(dtype) for k, v in regroup_state_dict(full_sd, config, None).items()}
    vq = {k: v.to(dtype) for k, v in (vq_state_dict or {}).items()}
    if vq:
        sd.update(vq)
        what = "VQ model copied from the starting checkpoint"
    else:
        hf.model.vqmodel = None  # not in the state dict, so not written
        what = "no VQ model (as Lumina's releases; the tokenizer bundle's VQGAN encodes and decodes images)"
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.model.rotary_emb = ChameleonRotaryEmbedding(config)
    hf.config.dtype = dtype
    hf.eval()
    hf.save_pretrained(out_dir, safe_serialization=True, max_shard_size="10GB")
    logger.info("exported HF-format model to %s (%s; %s)", out_dir, dtype, what)
    return out_dir

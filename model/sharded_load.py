"""Sharded loading of the starting weights from safetensors: each rank reads only the slices it owns.

The trainer builds the model on the meta device, shards it with FSDP2 (model/training/parallelize.py) and
allocates each rank's shards (``to_empty``). For a safetensors checkpoint (``model.safetensors``, or the
shards a ``model.safetensors.index.json`` lists), ``load_sharded_safetensors`` then fills those shards
straight from the files with torch distributed checkpoint: ``HuggingFaceStorageReader`` describes the
files from their headers, ``dcp.load`` plans for each parameter's DTensor the slice this rank holds, and
the reader fetches just that slice with safetensors' ``get_slice`` and copies it into the fp32 shard
(bf16 releases are promoted by that copy); the file is opened per tensor, so that the pages mapped at any
time are one slice's (see _PerTensorReader). No process holds the full model: a rank's peak is its own
shard plus one slice (bench/bench_sharded_load.py measures it). ``.bin``
checkpoints are pickles that cannot be read by slices: they keep the rank-0 path of finetune_solver.py
(rank 0 reads everything, ``set_model_state_dict`` broadcasts), and so does a run where some rank cannot
see the weight files (a hub snapshot downloaded by rank 0 into a machine-local cache).

Tensors whose stored shape differs from the parameter's (Lumina's [model_parallel_size, head_dim] q/k
norms) are tiny: every rank reads them whole, converts them with ``qk_norm.fit_qk_norm`` (the
same conversion as the rank-0 path) and keeps its own shard (``distribute_tensor(src_data_rank=None)``:
no communication).

Checks come first, on rank 0, from the files' headers only: every parameter of the model present (else
``ModelLoadError`` naming what is missing), extra keys warned about (``model.vqmodel.*``, which training
drops, silently), every shape equal to the parameter's after conversion (else ``ModelLoadError`` naming
the key, the file and both shapes). The verdict is broadcast, and a read failure on any rank is raised on
every rank: no rank waits forever for one that failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.futures import Future

from model.chameleon_lm import ChameleonLM, ModelLoadError, _weight_files
from model.qk_norm import NORM_KEY_RE, fit_qk_norm

logger = logging.getLogger(__name__)


class _PerTensorReader(HuggingFaceStorageReader):
    """torch's Hugging Face reader, opening the safetensors file once per tensor instead of once per file.

    safetensors reads through a memory map, and every page a rank touches stays in its resident memory until
    the file is closed: per file, that is the rank's part of a whole shard file (0.06-0.1x the model per
    rank in bench/bench_sharded_load.py, 4 files); per tensor, one slice. Opening costs one header parse per
    tensor. Reading and copying are the library's own (``_process_read_request``).
    """

    def read_data(self, plan, planner):
        from safetensors import safe_open

        for req in plan.items:
            with safe_open(self.storage_data[req.storage_index].relative_path, framework="pt") as f:
                self._process_read_request(f, req, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(obj):
    """rank 0's ``obj`` on every rank; an Exception from rank 0 is raised on every rank."""
    rank, world = _world()
    box = [obj if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _raise_if_any_failed(err: str | None) -> None:
    """Every rank calls this with its own error (or None); if any rank failed, all raise ModelLoadError."""
    _, world = _world()
    errs = [err]
    if world > 1:
        errs = [None] * world
        dist.all_gather_object(errs, err)
    failed = [(r, e) for r, e in enumerate(errs) if e]
    if failed:
        raise ModelLoadError("; ".join(f"rank {r}: {e}" for r, e in failed))


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The safetensors weight files of an HF dir ([] when it holds ``.bin`` files instead)."""
    files = _weight_files(Path(model_dir))
    return files if files[0].suffix == ".safetensors" else []


def sharded_loading_applies(model_dir: str | Path) -> bool:
    """True (on every rank alike) when the checkpoint is safetensors and every rank sees its files.
    Collective: call on all ranks."""
    rank, _ = _world()
    files: object = None
    if rank == 0:
        try:
            files = [str(f) for f in safetensors_files(model_dir)]
        except (ModelLoadError, OSError) as e:
            files = ModelLoadError(str(e))
    files = _from_rank0(files)
    if not files:
        return False
    seen = [all(Path(f).is_file() for f in files)]
    if _world()[1] > 1:  # an object collective: works on gloo and on nccl alike
        seen = [None] * _world()[1]
        dist.all_gather_object(seen, all(Path(f).is_file() for f in files))
    if not all(seen):
        logger.warning("%s: not every rank sees the weight files; rank 0 reads them and broadcasts", model_dir)
        return False
    return True


def plan_sharded_load(model_dir: str | Path, want: dict[str, tuple[int, ...]], config) -> dict:
    """Checks the checkpoint against the model from the safetensors headers (no tensor data is read).

    ``want``: the model's parameter shapes by key. Returns {"direct": [keys read by slices],
    "convert": {key: file} (read whole, converted), "extra": [keys the model lacks]}; raises
    ModelLoadError for a missing key, a key in two files, or a shape that does not fit.
    """
    from safetensors import SafetensorError, safe_open

    stored: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if ".vqmodel." in k:
                        continue
                    if k in stored:
                        raise ModelLoadError(f"{model_dir}: {k} is in both {Path(stored[k][1]).name} and {f.name}; "
                                             f"remove the stray weight file")
                    stored[k] = (tuple(sf.get_slice(k).get_shape()), str(f))
        except SafetensorError as e:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({e})") from e
    missing = sorted(set(want) - set(stored))
    if missing:
        raise ModelLoadError(f"{model_dir}: the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    direct, convert = [], {}
    for k, shape in want.items():
        s, f = stored[k]
        if s == tuple(shape):
            direct.append(k)
            continue
        if NORM_KEY_RE.match(k) is None:  # q/k norms in another grouping are converted (exactly) when read
            raise ModelLoadError(f"{f}: {k} has shape {list(s)} but the model's parameter is {list(shape)} "
                                 f"(config.json and the weights disagree)")
        convert[k] = f
    return {"direct": direct, "convert": convert, "extra": sorted(set(stored) - set(want))}


def load_sharded_safetensors(lm: ChameleonLM, model_dir: str | Path) -> None:
    """Fills ``lm``'s (FSDP-sharded, materialised) parameters from a safetensors HF dir, each rank reading
    only its own slices. Collective: call on all ranks. Raises ModelLoadError on every rank on failure."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    rank, _ = _world()
    sd = get_model_state_dict(lm)
    plan: object = None
    if rank == 0:
        try:
            plan = plan_sharded_load(model_dir, {k: tuple(v.shape) for k, v in sd.items()}, lm.config)
        except (ModelLoadError, OSError) as e:
            plan = ModelLoadError(str(e))
    plan = _from_rank0(plan)
    if plan["extra"]:
        logger.warning("%s: ignoring %d weights the model does not have, e.g. %s", model_dir, len(plan["extra"]),
                       plan["extra"][:3])
    try:
        dcp.load({k: sd[k] for k in plan["direct"]}, storage_reader=_PerTensorReader(str(model_dir)))
    except CheckpointException as e:  # raised on every rank alike by dcp.load
        raise ModelLoadError(f"{model_dir}: reading the weights by slices failed: {e}") from e
    err = None
    try:
        for k, f in plan["convert"].items():
            with safe_open(f, framework="pt") as sf:
                full = fit_qk_norm(k, sf.get_tensor(k), lm.config).to(sd[k].dtype)
            if isinstance(sd[k], DTensor):
                full = distribute_tensor(full.to(sd[k].device), sd[k].device_mesh, sd[k].placements,
                                         src_data_rank=None)
            sd[k] = full
    except Exception as e:  # noqa: BLE001 - any local failure must reach the other ranks, not leave them waiting
        err = f"{model_dir}: reading {k}: {type(e).__name__}: {e}"
    _raise_if_any_failed(err)
    set_model_state_dict(lm, sd, options=StateDictOptions(strict=True))
    logger.info("loaded %s by slices: %d tensors read sharded, %d read whole and converted (%s)", model_dir,
                len(plan["direct"]), len(plan["convert"]), ", ".join(list(plan["convert"])[:2]) or "none")

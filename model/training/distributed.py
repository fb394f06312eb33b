"""How this process was launched (torchrun, srun, or alone) and the process group that follows from it.

Precedence: the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``)
wins, so ``torchrun`` inside a SLURM allocation works; else SLURM's (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``; the master is the first host of ``SLURM_JOB_NODELIST``, e.g. ``node[01-04,07]`` ->
``node01``; the port is ``MASTER_PORT`` if set, else derived from ``SLURM_JOB_ID`` so two jobs sharing a
node do not collide); else one process. The backend is nccl when CUDA is available, gloo otherwise.

Every collective has a timeout (``--dist_timeout``): a rank that died makes the others fail with an
error instead of waiting forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


class LaunchError(RuntimeError):
    """The launch environment is inconsistent (names the variables)."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[01-04,07]`` -> ``node01``, ``a1,b2`` -> ``a1``,
    ``rack[1-2]-gpu[3,5]`` -> ``rack1-gpu3``. Zero padding is kept (it is part of the host name)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is empty")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # first top-level item (commas inside [...] do not split)
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]

    def first_of(m: re.Match) -> str:
        return re.split(r"[-,]", m.group(1), maxsplit=1)[0]

    host = re.sub(r"\[([^\]]*)\]", first_of, item)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return host


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from e


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Reads the launch environment (``env`` defaults to ``os.environ``); pure, so testable."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise LaunchError("SLURM_NTASKS > 1 but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
        else:
            port = DEFAULT_MASTER_PORT
        launcher = "slurm"
    else:
        rank, world, local, addr, port, launcher = 0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT, "single"
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is not in [0, world size {world}) ({launcher} environment)")
    return LaunchEnv(rank, world, local, addr, port, launcher)


def init_distributed(launch: LaunchEnv, timeout_s: float) -> torch.device:
    """Initialises the default process group for ``launch``; returns this rank's device."""
    if torch.cuda.is_available():
        n_gpu = torch.cuda.device_count()
        # one visible GPU per task (srun --gpu-bind / CUDA_VISIBLE_DEVICES per task): use it; else the local rank's
        index = 0 if n_gpu == 1 else launch.local_rank
        if index >= n_gpu:
            raise LaunchError(f"local rank {launch.local_rank} but only {n_gpu} GPUs are visible to this process")
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if launch.world_size == 1 and launch.launcher == "single":
        # no rendezvous needed: an in-memory store, so a lone run never fights over a port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        os.environ.update(MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port),
                          RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                          LOCAL_RANK=str(launch.local_rank))
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)
    logger.info("process group: %s, rank %d/%d (local %d), master %s:%d, launcher %s, device %s",
                backend, launch.rank, launch.world_size, launch.local_rank, launch.master_addr,
                launch.master_port, launch.launcher, device)
    return device


def init_model_parallel(model_parallel_size: int) -> None:
    """fairscale's model/data-parallel groups (Lumina's layout). Tensor parallelism is not implemented:
    with ``model_parallel_size > 1`` the model would silently be replicated, so that is an error."""
    if model_parallel_size != 1:
        raise LaunchError(f"--model_parallel_size {model_parallel_size}: tensor (model) parallelism is not "
                          f"implemented; use --model_parallel_size 1 (FSDP already shards parameters, "
                          f"gradients and optimizer state across all ranks)")
    from fairscale.nn.model_parallel import initialize as fs_init

    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(model_parallel_size)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            from fairscale.nn.model_parallel import initialize as fs_init

            if fs_init.model_parallel_is_initialized():
                fs_init.destroy_model_parallel()
        finally:
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a few floats over all ranks (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()

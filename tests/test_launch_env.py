"""Launch environments (model/training/distributed.py): torchrun, SLURM, single process; failures instead of hangs."""

from __future__ import annotations

import pytest

from dist_helper import free_port, spawn
from model.training.distributed import LaunchError, detect_launch_env, first_host


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"),
    ("node[01-04,07]", "node01"),
    ("node[07,01-04]", "node07"),
    ("gpu-a[003-005],gpu-b1", "gpu-a003"),
    ("a1,b[2-3]", "a1"),
    ("rack[1-2]-gpu[3,5]", "rack1-gpu3"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_simulated_slurm_env_gives_rank_world_size_and_master():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[12-13,20]"}
    le = detect_launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.launcher) == (5, 16, 1, "node12", "slurm")
    assert le.master_port == 20000 + 123456 % 20000
    assert detect_launch_env({**env, "MASTER_PORT": "1234"}).master_port == 1234


def test_torchrun_env_wins_over_slurm_and_single_is_the_fallback():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    le = detect_launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.launcher) == \
        (1, 2, 1, "h", 7, "torchrun")
    assert detect_launch_env({}).launcher == "single"
    with pytest.raises(LaunchError, match="rank 3"):
        detect_launch_env({"RANK": "3", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="SLURM_NTASKS"):
        detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "x"})


def _slurm_worker(rank: int) -> None:
    import torch
    import torch.distributed as dist

    from model.training.distributed import cleanup_distributed, detect_launch_env, init_distributed, init_model_parallel

    le = detect_launch_env()
    assert (le.rank, le.world_size, le.launcher) == (rank, 2, "slurm")
    init_distributed(le, timeout_s=60)
    init_model_parallel(1)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    assert t.item() == 3.0 and dist.get_rank() == rank and dist.get_world_size() == 2
    cleanup_distributed()


def test_two_tasks_of_a_simulated_slurm_job_form_one_process_group():
    port = str(free_port())
    spawn(_slurm_worker, 2, timeout=60, env_for_rank=lambda r: {
        "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r), "SLURM_JOB_NODELIST": "localhost",
        "MASTER_PORT": port})


def _dying_worker(rank: int) -> None:
    import os
    import time

    import torch
    import torch.distributed as dist

    from model.training.distributed import detect_launch_env, init_distributed

    init_distributed(detect_launch_env(), timeout_s=5)
    if rank == 1:
        os._exit(0)  # dies without a word, as a crashed or killed rank does
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError:
        assert time.time() - t0 < 30
        return
    raise AssertionError("all_reduce with a dead peer returned normally")


def test_a_dead_rank_makes_the_other_fail_instead_of_hanging():
    port = str(free_port())
    spawn(_dying_worker, 2, timeout=60, silent_ranks=(1,), env_for_rank=lambda r: {
        "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})

"""Benchmark: per-rank parameter + optimizer memory with FSDP2 on 2 ranks vs 1 rank (CPU, gloo).

    python bench/bench_fsdp_memory.py                      # the 8.66M model of bench_train_step.py
    python bench/bench_fsdp_memory.py --hidden 512 --layers 6 --data_parallel sdp

Each world size runs as real processes (gloo, one process per rank, this script in --worker mode): the
model is built on the meta device, wrapped by model.training.parallelize.parallelize exactly as the trainer does,
materialised, loaded from rank 0, and trained one step with finetune_solver.train_step so AdamW has its
state. Each rank reports, 1 and 2 ranks in the same run:

- measured, by the C allocator: the bytes malloc holds for the process (glibc ``mallinfo2``: in-use heap
  chunks + mmapped chunks; the ranks run with MALLOC_ARENA_MAX=1 so every thread's allocations are in the
  one arena it reports) after the step with gradients freed, minus the same before the model was built:
  what the model and its optimizer state occupy on that rank, however FSDP lays them out (and the same
  after loading, before the step: the model alone);
- measured, peak RSS growth during the step (VmHWM after resetting it with /proc/self/clear_refs, minus
  VmRSS then): parameters gathered for compute, activations, gradients, the optimizer's temporaries;
- computed, not measured: the bytes of its parameter shards (DTensor local tensors) and optimizer state
  tensors (exp_avg, exp_avg_sq, step) from their sizes, which is what FSDP is meant to divide.

VmRSS is printed for context; it is dominated by the ~300 MB of libraries every process loads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import torch


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak_rss() -> float:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux clear_refs); returns VmRSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_mb()


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def malloc_in_use_mb() -> float:
    """MB the C allocator holds for live allocations: glibc mallinfo2's uordblks (in-use chunks of the main
    arena) + hblkhd (mmapped chunks). Run with MALLOC_ARENA_MAX=1 so that every thread uses that arena.
    Collects garbage first, so what is counted is what is still referenced."""
    import ctypes
    import gc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


def initial_weights(cfg, rank: int) -> dict:
    """transformers' seeded init of the model (no VQ model) on rank 0, {} elsewhere (for broadcast_from_rank0)."""
    from transformers import ChameleonForConditionalGeneration

    if rank != 0:
        return {}
    torch.manual_seed(0)
    return {k: v for k, v in ChameleonForConditionalGeneration(cfg).state_dict().items() if ".vqmodel." not in k}


def worker(a) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from bench_train_step import load_solver, tiny_config
    from model.chameleon_lm import build_chameleon_lm
    from model.training.optim import build_optimizer
    from model.training.parallelize import parallelize

    torch.set_num_threads(1)
    fs = load_solver()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(a.vocab, a.hidden, a.layers, a.heads)
    args = fs.parse_args(["--data_config", __file__, "--precision", "fp32", "--data_parallel", a.data_parallel])
    dist.barrier()
    before_model = malloc_in_use_mb()
    full = initial_weights(cfg, rank)
    lm = build_chameleon_lm(cfg, device="meta")
    parallelize(lm, init_device_mesh("cpu", (world,)), data_parallel=a.data_parallel, precision="fp32")
    lm.to_empty(device="cpu")
    lm.reset_nonpersistent_buffers("cpu")
    set_model_state_dict(lm, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    opt = build_optimizer(lm, lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(8196, a.vocab, (1, 256), generator=g)
    batch = [{"input_ids": ids, "labels": ids, "n_real_tokens": torch.tensor(ids.numel())}]
    del g
    loaded = malloc_in_use_mb() - before_model  # also collects the loading's garbage before the peak is reset
    rss_before_step = reset_peak_rss()
    fs.train_step(lm, opt, batch, a=args, device=torch.device("cpu"), lr=1e-4, n_params_no_embed=1)
    step_peak = peak_rss_mb() - rss_before_step
    opt.zero_grad(set_to_none=True)
    held = malloc_in_use_mb() - before_model

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    param_b = sum(local_bytes(p) for p in lm.parameters())
    opt_b = sum(local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    print(json.dumps({"rank": rank, "world": world, "param_mb": param_b / 2**20, "optim_mb": opt_b / 2**20,
                      "malloc_mb": held, "malloc_loaded_mb": loaded, "step_peak_rss_mb": step_peak, "rss_mb": _rss_mb()}), flush=True)
    dist.destroy_process_group()


def spawn_ranks(world: int, argv: list[str], timeout: float = 600) -> list[str]:
    """Runs ``argv`` as ``world`` gloo ranks (torchrun's environment, one thread each, one malloc arena so
    that ``malloc_in_use_mb`` sees every thread's allocations); their stdouts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={
        **os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}) for r in range(world)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode:
            raise SystemExit(f"rank failed with code {p.returncode}")
        outs.append(out)
    return outs


def run_ranks(argv: list[str], world: int, timeout: float = 600) -> list[dict]:
    """``spawn_ranks``, where each rank's last stdout line is a JSON object; those objects in rank order."""
    return [json.loads(out.strip().splitlines()[-1]) for out in spawn_ranks(world, argv, timeout)]


def run_world(world: int, a) -> list[dict]:
    return run_ranks([sys.executable, __file__, "--worker", "--vocab", str(a.vocab), "--hidden", str(a.hidden),
                      "--layers", str(a.layers), "--heads", str(a.heads), "--data_parallel", a.data_parallel], world)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=10760, help="vocabulary size")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=3, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--data_parallel", choices=["fsdp", "sdp"], default="fsdp", help="sharding mode")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    one = run_world(1, a)
    two = run_world(2, a)
    base = one[0]["param_mb"] + one[0]["optim_mb"]
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; --data_parallel {a.data_parallel}")
    print("| world | rank | measured: malloc held after loading, MB | vs 1 rank | measured: malloc held after "
          "the step, MB | vs 1 rank | measured: peak RSS growth in the step, MB | vs 1 rank | computed: params + "
          "optimizer shard sizes, MB | vs 1 rank | VmRSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in one + two:
        tot = r["param_mb"] + r["optim_mb"]
        print(f"| {r['world']} | {r['rank']} | {r['malloc_loaded_mb']:.2f} | "
              f"{r['malloc_loaded_mb'] / one[0]['malloc_loaded_mb']:.3f}x | "
              f"{r['malloc_mb']:.2f} | {r['malloc_mb'] / one[0]['malloc_mb']:.3f}x | "
              f"{r['step_peak_rss_mb']:.1f} | {r['step_peak_rss_mb'] / one[0]['step_peak_rss_mb']:.3f}x | {tot:.2f} | "
              f"{tot / base:.3f}x | {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

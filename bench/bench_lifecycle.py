"""Benchmark: what the lifecycle's per-step stop agreement costs (model/training/lifecycle.py), 2 ranks, gloo, CPU.

    python bench/bench_lifecycle.py                       # Chameleon hidden 256, 3 layers, 1 x 512 tokens per rank
    python bench/bench_lifecycle.py --rounds 9 --steps 4 --seq 256

Every optimizer step the trainer calls ``Lifecycle.should_stop`` (one all-reduce of two int64 across the ranks)
and ``Lifecycle.progress`` (re-arms faulthandler's GIL backstop). Two ranks run, in alternating order each
round, ``--steps`` training steps (``finetune_solver.train_step`` on the FSDP2-wrapped tiny model) with and
without those two calls; the figure is the median over rounds of the step-time ratio. The agreement alone is
also timed (``--calls`` back-to-back calls) and put against the median step time. Wall clock; a shared
machine's noise is why the two alternate and the median is taken.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BENCH = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rank(rank: int, a: argparse.Namespace, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    bts = _load("bench_train_step", BENCH / "bench_train_step.py")
    fs = bts.load_solver()
    from torch.distributed.device_mesh import init_device_mesh

    from model.chameleon_lm import build_chameleon_lm
    from model.training.lifecycle import Lifecycle
    from model.training.optim import build_optimizer
    from model.training.parallelize import parallelize

    cfg = bts.tiny_config(10760, a.hidden, a.layers, 4)
    args = fs.parse_args(["--data_config", __file__, "--precision", "fp32"])
    torch.manual_seed(0)
    lm = build_chameleon_lm(cfg, device="meta", mask_image_logits=True, z_loss_weight=0.0, dropout=0.0,
                            loss_chunk_size=1024)
    parallelize(lm, init_device_mesh("cpu", (2,)), data_parallel="fsdp", precision="fp32")
    lm.to_empty(device="cpu")
    lm.reset_nonpersistent_buffers("cpu")
    for p in lm.parameters():  # any finite weights do: the step's cost does not depend on them
        torch.nn.init.normal_(p.data if not hasattr(p, "to_local") else p.to_local(), std=0.02)
    lm.train()
    opt = build_optimizer(lm, lr=1e-4, weight_decay=0.0)
    _, n_no_embed = fs._count_params(lm)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(8196, 10760, (1, a.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "n_real_tokens": torch.tensor(ids.numel())}
    lc = Lifecycle(output_dir=out_dir, rank=rank, world=2, device=torch.device("cpu"), exit_signals="none",
                   hang_timeout=1800).start()
    cpu = torch.device("cpu")

    def step():
        fs.train_step(lm, opt, [batch], a=args, device=cpu, lr=1e-4, n_params_no_embed=n_no_embed)

    def timed(with_lifecycle: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(a.steps):
            if with_lifecycle:
                assert lc.should_stop(i) is None
            step()
            if with_lifecycle:
                lc.progress()
        return (time.perf_counter() - t0) / a.steps

    for _ in range(2):
        timed(True)
        timed(False)
    ratios, plain = [], []
    for r in range(a.rounds):
        if r % 2 == 0:
            w, wo = timed(True), timed(False)
        else:
            wo, w = timed(False), timed(True)
        ratios.append(w / wo)
        plain.append(wo)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(a.calls):
        lc.should_stop(i)
        lc.progress()
    per_call = (time.perf_counter() - t0) / a.calls
    lc.close()
    if rank == 0:
        s = statistics.median(plain)
        print(f"model hidden {a.hidden}, {a.layers} layers, 1 x {a.seq} tokens per rank, 2 ranks gloo, 1 thread each")
        print(f"step without lifecycle: median {s * 1e3:.1f} ms; step with should_stop + progress / without: "
              f"median ratio {statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f}, "
              f"{a.rounds} rounds of {a.steps} steps)")
        print(f"should_stop + progress alone: {per_call * 1e6:.0f} us per call ({a.calls} calls) = "
              f"{per_call / s * 100:.3f} % of a median step")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=3, help="decoder layers")
    p.add_argument("--seq", type=int, default=512, help="tokens per rank per step")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--calls", type=int, default=500, help="back-to-back agreement calls timed alone")
    a = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(a, port, d), nprocs=2, join=True)


if __name__ == "__main__":
    main()

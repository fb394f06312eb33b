"""Benchmark: the planner's predicted peak memory per rank vs the measured one (CPU, gloo, 1 and 2 ranks).

    python bench/bench_planner.py                 # the default grid: tiny and small configs, 1 and 2 ranks,
                                                  # with and without --checkpointing
    python bench/bench_planner.py --configs small --worlds 2 --checkpointing 1

Each case runs as real processes (one per rank, this script in --worker mode), built the trainer's way:
the model on the meta device, ``model.training.parallelize.parallelize`` (FSDP2 units, checkpointing wrapper),
``to_empty``, AdamW from ``model.training.optim``, then ``finetune_solver.train_step`` on random token batches in
which every position is labelled (the planner's worst case) with ``--accum_iter`` micro-batches per step.

What is measured: the peak of the bytes held by torch tensors during the second optimizer step (the
first step also creates the AdamW states; from the second on the run is in its steady state). Between
the steps, the storages alive are counted directly (the padded storages of the parameter shards, the
AdamW states, the step's input batches); during the step, the torch profiler (``profile_memory=True``)
records every allocation and free of torch's CPU allocator with its size, and their running sum added to
what lived before is the live tensor memory at every moment; its maximum is the peak. That is the
quantity the planner predicts and the one ``torch.cuda.max_memory_allocated`` reports on a GPU.

Limits: it counts torch tensors only, not the Python heap, the interpreter, libraries, glibc's caching or
gloo's internal buffers (process RSS is ~500 MB of libraries for every case and says nothing about the
model). The GPU-only terms of the plan (allocator slack, CUDA context) are left out of the comparison
(``on_gpu=False``); bench/gpu_check.sh compares them on a GPU. fp32 throughout: bf16 on a CPU is slow
and has the same shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

CONFIGS = {  # name: (vocab, hidden, layers, heads)
    "tiny": (10760, 64, 2, 4),
    "small": (16384, 256, 4, 4),
}


def _settings(a, world: int):
    from model.training.planner import Settings

    return Settings(batch_size=a.batch_size, accum_iter=a.accum_iter, max_seq_len=a.seq_len, precision="fp32",
                    checkpointing=bool(a.checkpointing), loss_chunk_size=a.loss_chunk_size, world_size=world,
                    mask_image_logits=True)


def materialize_random(lm, device: str) -> None:
    """Allocates a meta-built, sharded model on ``device`` with small random weights (memory, not quality)."""
    lm.to_empty(device=device)
    lm.reset_nonpersistent_buffers(device)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.02)


def worker(a) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    from bench_train_step import load_solver, tiny_config
    from model.chameleon_lm import build_chameleon_lm
    from model.training.optim import build_optimizer
    from model.training.parallelize import parallelize

    torch.set_num_threads(1)
    fs = load_solver()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab, hidden, layers, heads = CONFIGS[a.config]
    cfg = tiny_config(vocab, hidden, layers, heads)
    cfg._attn_implementation = "sdpa"
    lm = build_chameleon_lm(cfg, device="meta", loss_chunk_size=a.loss_chunk_size)
    parallelize(lm, init_device_mesh("cpu", (world,)), precision="fp32", checkpointing=bool(a.ckpt))
    args = fs.parse_args(["--data_config", __file__, "--precision", "fp32", "--batch_size", str(a.batch_size),
                          "--accum_iter", str(a.accum_iter)])
    g = torch.Generator().manual_seed(rank)

    def micro():
        ids = torch.randint(8196, vocab, (a.batch_size, a.seq_len), generator=g)
        return {"input_ids": ids, "labels": ids.clone(), "n_real_tokens": torch.tensor(ids.numel())}

    materialize_random(lm, "cpu")
    opt = build_optimizer(lm, lr=1e-4, weight_decay=0.1)
    step = lambda batches: fs.train_step(lm, opt, batches, a=args, device=torch.device("cpu"), lr=1e-4,  # noqa: E731
                                         n_params_no_embed=1)
    step([micro() for _ in range(a.accum_iter)])  # creates the AdamW states: from now on the steady state
    # what lives between steps: parameter shards (their padded storages) and AdamW states
    storages = {}
    for t in list(lm.parameters()) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]:
        st = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    before = sum(storages.values())
    batches = [micro() for _ in range(a.accum_iter)]
    inputs = sum(2 * b["input_ids"].numel() * 8 for b in batches)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batches)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live, peak, t_peak = 0, 0, None
    for t, n in events:
        live += n
        if live > peak:
            peak, t_peak = live, t
    peak += before + inputs
    if a.debug:  # what runs at the peak: the recorded ops whose span contains it, outermost first
        ops = [(e.end_ns() - e.start_ns(), e.name()) for e in prof.profiler.kineto_results.events()
               if e.name() != "[memory]" and e.start_ns() <= t_peak <= e.end_ns()]
        print(f"rank {rank} between steps {before / 2**20:.2f} MB, peak {peak / 2**20:.2f} MB in: "
              + " > ".join(n for _, n in sorted(ops, reverse=True)), file=sys.stderr, flush=True)
    print(json.dumps({"rank": rank, "world": world, "peak_bytes": peak, "between_steps": before}), flush=True)
    dist.destroy_process_group()


def run_case(a, config: str, world: int, ckpt: int) -> list[dict]:
    from bench_fsdp_memory import run_ranks

    return run_ranks([sys.executable, __file__, "--worker", "--config", config, "--ckpt", str(ckpt), "--batch_size",
                      str(a.batch_size), "--accum_iter", str(a.accum_iter), "--seq_len", str(a.seq_len),
                      "--loss_chunk_size", str(a.loss_chunk_size)] + (["--debug"] if a.debug else []), world, 1200)


def predict(a, config: str, world: int, ckpt: int) -> dict:
    from bench_train_step import tiny_config
    from model.training.planner import Model, plan_memory

    vocab, hidden, layers, heads = CONFIGS[config]
    cfg = tiny_config(vocab, hidden, layers, heads)
    cfg._attn_implementation = "sdpa"
    m = Model.from_config(cfg, config)
    a2 = argparse.Namespace(**{**vars(a), "checkpointing": bool(ckpt)})
    return plan_memory(m, _settings(a2, world), on_gpu=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="model configs")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2], help="world sizes (gloo ranks)")
    p.add_argument("--checkpointing", nargs="+", type=int, default=[0, 1], choices=[0, 1],
                   help="activation checkpointing off (0) / on (1)")
    p.add_argument("--config", default="tiny", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, default=2, help="items per micro-batch")
    p.add_argument("--accum_iter", type=int, default=2, help="micro-batches per step")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per item (all labelled)")
    p.add_argument("--loss_chunk_size", type=int, default=256, help="rows per chunk of the head + loss")
    p.add_argument("--debug", action="store_true", help="print the ops running at each rank's peak")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    print(f"batch_size {a.batch_size}, accum_iter {a.accum_iter}, seq_len {a.seq_len}, loss_chunk_size "
          f"{a.loss_chunk_size}, fp32, fsdp")
    print("| config (vocab, hidden, layers) | ranks | checkpointing | predicted MB | measured MB (max over ranks) "
          "| measured / predicted | predicted peak phase |")
    print("|---|---|---|---|---|---|---|")
    for config in a.configs:
        for world in a.worlds:
            for ck in a.checkpointing:
                pred = predict(a, config, world, ck)
                rows = run_case(a, config, world, ck)
                meas = max(r["peak_bytes"] for r in rows)
                v, h, n, _ = CONFIGS[config]
                print(f"| {config} ({v}, {h}, {n}) | {world} | {'on' if ck else 'off'} | "
                      f"{pred['allocated_peak_bytes'] / 2**20:.1f} | {meas / 2**20:.1f} | "
                      f"{meas / pred['allocated_peak_bytes']:.3f} | {pred['peak_phase']} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()

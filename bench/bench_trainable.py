"""Benchmark: per-rank memory (parameters + gradients + optimizer state) and step time of trainable subsets and
LoRA against full fine-tuning, with FSDP2 on real gloo ranks (CPU).

    python bench/bench_trainable.py                          # 2 ranks, hidden 256, 4 layers, vocab 10760
    python bench/bench_trainable.py --world 1 --rounds 5 --hidden 512 --layers 4

Each rank builds one model per setting (all, no_embed, norms, image_head, LoRA r=8 on q,k,v,o, LoRA r=8 on
q,k,v,o + image_head) exactly as the trainer does: meta device, model.training.lora.apply_lora, model.training.trainable's
apply_trainable, model.training.parallelize.parallelize, the same initial weights from rank 0, the optimizer of
model.training.optim + trainable.attach_to_optimizer. Then rounds of one finetune_solver.train_step per setting,
interleaved (so the machine's load hits every setting alike). Memory per rank, two ways:

- measured: after the rounds, each setting's model and optimizer are deleted in turn and the drop in the
  bytes the C allocator holds (glibc ``mallinfo2``, one arena per process: bench_fsdp_memory.malloc_in_use_mb)
  is what that setting held between steps: parameters and optimizer state, gradients freed;
- computed from tensor sizes, not measured: its parameter shards, its gradient shards (at the step, before
  they are freed), its optimizer state (exp_avg, exp_avg_sq, step) - what FSDP divides and freezing removes.

Activations are in neither (the same for every setting up to the LoRA branches). Step time: median over rounds of the slowest rank's wall time, and of its CPU time (process time; one thread
per rank, so it moves less with the machine's load than wall time does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch

SETTINGS = {  # name -> (--trainable, --lora_rank)
    "all (full fine-tuning)": (None, 0),
    "no_embed": ("no_embed", 0),
    "norms": ("norms", 0),
    "image_head": ("image_head", 0),
    "LoRA r=8 q,k,v,o": (None, 8),
    "LoRA r=8 q,k,v,o + image_head": ("image_head", 8),
}


def _bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(a) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from bench_fsdp_memory import initial_weights, malloc_in_use_mb
    from bench_train_step import load_solver, tiny_config
    from model.chameleon_lm import build_chameleon_lm
    from model.training.lora import apply_lora, hf_to_model_state
    from model.training.optim import build_optimizer
    from model.training.parallelize import parallelize
    from model.training.trainable import apply_trainable, attach_to_optimizer, shard_row_masks

    torch.set_num_threads(1)
    fs = load_solver()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(a.vocab, a.hidden, a.layers, a.heads)
    mesh = init_device_mesh("cpu", (world,))
    hf_sd = initial_weights(cfg, rank)
    models = {}
    for name, (spec, r) in SETTINGS.items():
        lm = build_chameleon_lm(cfg, device="meta")
        apply_lora(lm, SimpleNamespace(lora_rank=r, lora_alpha=16.0, lora_dropout=0.0,
                                       lora_targets="q_proj,k_proj,v_proj,o_proj", seed=0))
        n_train = apply_trainable(lm, spec, lora=r > 0)["trainable_params"]
        parallelize(lm, mesh, precision="fp32", checkpointing=a.checkpointing)
        lm.to_empty(device="cpu")
        lm.reset_nonpersistent_buffers("cpu")
        shard_row_masks(lm)
        full = hf_to_model_state(lm, dict(hf_sd)) if rank == 0 else {}  # (set_model_state_dict consumes it)
        set_model_state_dict(lm, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full  # it may keep references into the model's tensors: the measurement below would miss them
        opt = attach_to_optimizer(build_optimizer(lm, lr=1e-4, weight_decay=0.1), lm)
        grads = {}
        opt.register_step_post_hook(lambda o, *_, lm=lm, g=grads: g.update(
            b=sum(_bytes(p.grad) for p in lm.parameters() if p.grad is not None)))
        models[name] = (lm, opt, grads, n_train)
    args = fs.parse_args(["--data_config", __file__, "--precision", "fp32"])
    g = torch.Generator().manual_seed(rank)
    times = {n: [] for n in SETTINGS}
    for rnd in range(a.rounds + 1):  # round 0 warms up
        ids = torch.randint(8196, a.vocab, (1, a.seq), generator=g)
        ids[0, 10:10 + a.seq // 2] = torch.randint(4, 8196, (a.seq // 2,), generator=g)  # an image block
        batch = [{"input_ids": ids, "labels": ids, "n_real_tokens": torch.tensor(ids.numel())}]
        for name, (lm, opt, _, _) in models.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fs.train_step(lm, opt, batch, a=args, device=torch.device("cpu"), lr=1e-4, n_params_no_embed=1)
            dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rnd:
                times[name].append(dt.tolist())
    rows = []
    for name, (lm, opt, grads, n_train) in models.items():
        rows.append({"setting": name, "rank": rank, "world": world, "trainable": n_train,
               "total": sum(p.numel() for p in lm.parameters()),
               "param_mb": sum(_bytes(p) for p in lm.parameters()) / 2**20, "grad_mb": grads.get("b", 0) / 2**20,
               "optim_mb": sum(_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
               / 2**20, "step_s": statistics.median(t[0] for t in times[name]),
               "step_cpu_s": statistics.median(t[1] for t in times[name])})
    del lm, opt, grads
    for row in rows:  # measured: what deleting this setting's model and optimizer gives back
        before = malloc_in_use_mb()
        del models[row["setting"]]
        row["held_mb"] = before - malloc_in_use_mb()
        print("ROW " + json.dumps(row), flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks (processes)")
    p.add_argument("--vocab", type=int, default=10760, help="vocabulary size (image codes at 4..8195)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq", type=int, default=512, help="tokens per step per rank (half of them image codes)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step per setting each)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (default off)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    from bench_fsdp_memory import spawn_ranks

    argv_w = [sys.executable, __file__, "--worker", *sum(([f"--{k}", str(getattr(a, k))] for k in (
        "vocab", "hidden", "layers", "heads", "seq", "rounds")), [])] + (["--checkpointing"] if a.checkpointing else [])
    rows = [json.loads(line[4:]) for out in spawn_ranks(a.world, argv_w, timeout=1800) for line in out.splitlines()
            if line.startswith("ROW ")]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    tot = lambda r: r["param_mb"] + r["grad_mb"] + r["optim_mb"]  # noqa: E731
    r0 = [r for r in rows if r["rank"] == 0]
    spread = max(abs(tot(r) - tot(q)) for r in rows for q in rows if r["setting"] == q["setting"])
    base = r0[0]
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, {base['total'] / 1e6:.2f}M parameters; "
          f"{a.world} rank(s), {a.seq} tokens/rank/step, {a.rounds} rounds; load average {' '.join(load)}; "
          f"largest difference between ranks in total MB: {spread:.3f}")
    held = {r["setting"]: [q["held_mb"] for q in rows if q["setting"] == r["setting"]] for r in r0}
    print("| setting | trainable params | measured: held between steps MB/rank (rank 0, 1, ...) | vs full | "
          "computed: params MB/rank | grads MB/rank | optimizer MB/rank | total MB/rank | vs full | "
          "step wall s | vs full | step CPU s | vs full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in r0:
        h, hb = held[r["setting"]], held[base["setting"]]
        print(f"| {r['setting']} | {r['trainable'] / 1e6:.3f}M ({100 * r['trainable'] / r['total']:.1f}%) | "
              f"{', '.join(f'{x:.2f}' for x in h)} | {max(h) / max(hb):.3f}x | "
              f"{r['param_mb']:.2f} | {r['grad_mb']:.2f} | {r['optim_mb']:.2f} | {tot(r):.2f} | "
              f"{tot(r) / tot(base):.3f}x | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x | "
              f"{r['step_cpu_s']:.3f} | {r['step_cpu_s'] / base['step_cpu_s']:.2f}x |")


if __name__ == "__main__":
    main()

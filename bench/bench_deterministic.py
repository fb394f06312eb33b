"""Benchmark: what --deterministic costs per training step on a CPU (model/training/run_controls.py).

    python bench/bench_deterministic.py --threads 1 --rounds 11
    python bench/bench_deterministic.py --threads 1 --rounds 11 --lumina_loss

The model, batch and step are bench_train_step.py's (Chameleon hidden 256, 3 layers, vocab 10760; 2 x 1024
tokens; ``finetune_solver.train_step`` on the FSDP2-wrapped model, one gloo rank, fp32). The two variants
alternate on the same model within each round (order flipped every round): the default settings, and
``enable_determinism()`` (deterministic algorithms, which on a CPU also fill every new uninitialised tensor
with NaN, math attention, ...). Reported: median over rounds of (deterministic tokens/s) / (default
tokens/s), by wall clock and by this process's CPU time. The GPU cost is not measured here (no GPU): on
CUDA the math attention backend and deterministic index/scatter kernels are the expected main costs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.distributed as dist

from bench_train_step import load_solver, tiny_config


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    fs = load_solver()
    from model.chameleon_lm import build_chameleon_lm
    from model.training.optim import build_optimizer
    from model.training.parallelize import parallelize
    from model.training.run_controls import enable_determinism

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=3, help="decoder layers")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no_fill", action="store_true",
                   help="deterministic variant without torch.utils.deterministic.fill_uninitialized_memory (to see "
                        "how much of the cost is the NaN fill of new tensors)")
    p.add_argument("--lumina_loss", action="store_true",
                   help="Lumina 7B's loss settings (unmasked image logits, z-loss 1e-5, dropout 0.05)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    vocab = 10760
    cfg = tiny_config(vocab, a.hidden, a.layers, 4)
    flags = ["--data_config", __file__, "--precision", "fp32"]
    if a.lumina_loss:
        flags += ["--unmask_image_logits", "--z_loss_weight", "1e-5", "--dropout", "0.05"]
    args = fs.parse_args(flags)
    torch.manual_seed(0)
    lm = build_chameleon_lm(cfg, device="cpu", mask_image_logits=args.mask_image_logits,
                            z_loss_weight=args.z_loss_weight, dropout=args.dropout)
    parallelize(lm, init_device_mesh("cpu", (1,)), data_parallel="fsdp", precision="fp32")
    lm.train()
    opt = build_optimizer(lm, lr=1e-5, weight_decay=0.0)
    _, n_no_embed = fs._count_params(lm)
    ids = torch.randint(8196, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "n_real_tokens": torch.tensor(ids.numel())}
    tokens = ids.numel()

    def timed(deterministic: bool) -> tuple[float, float]:
        restore = enable_determinism() if deterministic else None
        torch.utils.deterministic.fill_uninitialized_memory = not a.no_fill
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                fs.train_step(lm, opt, [batch], a=args, device=torch.device("cpu"), lr=1e-5,
                              n_params_no_embed=n_no_embed)
            return a.steps * tokens / (time.perf_counter() - w0), a.steps * tokens / (time.process_time() - c0)
        finally:
            if restore is not None:
                restore()
            torch.utils.deterministic.fill_uninitialized_memory = True

    timed(False), timed(True)  # warmup
    rows = []
    for r in range(a.rounds):
        if r % 2 == 0:
            base, det = timed(False), timed(True)
        else:
            det, base = timed(True), timed(False)
        rows.append((base, det))
        print(f"round {r}: wall: default {base[0]:.0f} tok/s, deterministic {det[0]:.0f} tok/s, ratio "
              f"{det[0] / base[0]:.3f}; cpu ratio {det[1] / base[1]:.3f}", flush=True)
    print(f"hidden {a.hidden}, {a.layers} layers, vocab {vocab}, batch {a.batch}x{a.seq}, fp32, "
          f"{torch.get_num_threads()} threads, loss settings: {'Lumina 7B' if a.lumina_loss else 'defaults'}"
          f"{', no NaN fill' if a.no_fill else ''}")
    for i, clock in enumerate(("wall", "cpu")):
        ratios = [d[i] / b[i] for b, d in rows]
        print(f"{clock} clock: median default {statistics.median(b[i] for b, _ in rows):.0f} tok/s, deterministic "
              f"{statistics.median(d[i] for _, d in rows):.0f} tok/s, median ratio {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

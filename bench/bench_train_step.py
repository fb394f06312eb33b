"""Benchmark: tokens/s of the trainer's step vs a bare transformers forward + backward + AdamW loop.

    python bench/bench_train_step.py                     # 8.6M-parameter Chameleon, batch 2 x 1024, fp32 CPU
    python bench/bench_train_step.py --rounds 11 --steps 4 --hidden 256 --layers 3

Same model (random init, copied into both), same batch (2 x 1024 random text tokens, all labelled):

- bare: ``ChameleonForConditionalGeneration(input_ids, labels=input_ids, use_cache=False).loss.backward()``,
  ``AdamW.step()``, ``zero_grad()`` (VQ model removed; its parameters would only idle).
- ours: ``finetune_solver.train_step`` on the FSDP2-wrapped ``ChameleonLM`` (one process, gloo): label
  counting and its all-reduce, chunked head + loss with image-logit masking, gradient clipping, the
  metric all-reduce, AdamW without decay on norms, exactly as in training (``--precision fp32``).

``--compile``: instead, ours eager (in the "bare" slot) against ours with ``--compile`` (each decoder layer
torch.compile'd, model/training/parallelize.py); the compiled model's first step (compilation) is timed
apart and printed, not counted.

Timings on a shared machine drift by +-20% over minutes, so the two alternate: each round times
``--steps`` steps of one then of the other (the order flips every round), after warmup; the figure is
the median over rounds of (our tokens/s) / (bare tokens/s) within the round. Two clocks: wall time, and
this process's CPU time (with ``--threads 1`` the latter hardly depends on what else runs on the machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("bench_train_step")


def tiny_config(vocab: int, hidden: int, layers: int, heads: int):
    from transformers import ChameleonConfig

    vm = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for code in range(8192):  # Chameleon's layout: image codes at 4..8195
        vm["IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"] = 4 + code
    for i in range(8196, vocab):
        vm[f"t{i}"] = i
    vm["<image>"] = 8196 + 10
    return ChameleonConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           vocabulary_map=vm, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           vq_config=dict(embed_dim=32, num_embeddings=8192, latent_channels=32, base_channels=32,
                                          channel_multiplier=[1], resolution=16, attn_resolutions=[]))


def load_solver():
    """finetune_solver.py is a script at the repo root, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("finetune_solver", Path(__file__).resolve().parents[1] /
                                                  "finetune_solver.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["finetune_solver"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import ChameleonForConditionalGeneration

    fs = load_solver()
    from model.chameleon_lm import build_chameleon_lm
    from model.training.optim import BETAS, build_optimizer
    from model.training.parallelize import parallelize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=10760, help="vocabulary size (the tiny bundle's)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=3, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--lumina_loss", action="store_true",
                   help="ours with Lumina 7B's loss settings (unmasked image logits, z-loss 1e-5, dropout 0.05)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU): the same code on a GPU")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="--precision of ours (bf16 on GPUs)")
    p.add_argument("--compile", action="store_true",
                   help="compare ours eager (baseline) with ours --compile instead of the bare loop")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)

    dev = torch.device(a.device)
    if dev.type == "cuda":
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=dev)
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = tiny_config(a.vocab, a.hidden, a.layers, a.heads)
    torch.manual_seed(0)
    bare = ChameleonForConditionalGeneration(cfg)
    del bare.model.vqmodel
    bare.to(dev)
    bare.train()
    n_params = sum(p.numel() for p in bare.parameters())
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, betas=BETAS, weight_decay=0.0, foreach=True)

    flags = ["--data_config", __file__, "--precision", a.precision]
    if a.lumina_loss:
        flags += ["--unmask_image_logits", "--z_loss_weight", "1e-5", "--dropout", "0.05"]
    args = fs.parse_args(flags)
    mesh = init_device_mesh(dev.type, (1,))

    def build(compile: bool):
        lm = build_chameleon_lm(cfg, device="meta", mask_image_logits=args.mask_image_logits,
                                z_loss_weight=args.z_loss_weight, dropout=args.dropout,
                                loss_chunk_size=args.loss_chunk_size)
        parallelize(lm, mesh, data_parallel="fsdp", precision=a.precision, compile=compile)
        lm.to_empty(device=dev)
        lm.reset_nonpersistent_buffers(dev)
        set_model_state_dict(lm, {k: v for k, v in bare.state_dict().items()},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        lm.train()
        return lm, build_optimizer(lm, lr=1e-4, weight_decay=0.0)

    lm, opt = build(a.compile)
    _, n_no_embed = fs._count_params(lm)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8196, a.vocab, (a.batch, a.seq), generator=g).to(dev)
    batch = {"input_ids": ids, "labels": ids.clone(), "n_real_tokens": torch.tensor(ids.numel())}
    tokens = ids.numel()

    def bare_step():
        out = bare(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def our_step():
        fs.train_step(lm, opt, [batch], a=args, device=dev, lr=1e-4, n_params_no_embed=n_no_embed)

    names = ("bare", "ours")
    if a.compile:  # the baseline slot runs ours eager
        lm_e, opt_e = build(False)
        del bare, bare_opt

        def bare_step():
            fs.train_step(lm_e, opt_e, [batch], a=args, device=dev, lr=1e-4,
                          n_params_no_embed=n_no_embed)
        names = ("eager", "compiled")
        t0 = time.perf_counter()
        our_step()
        print(f"compiled model's first step (compiling): {time.perf_counter() - t0:.1f} s", flush=True)

    def timed(fn) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        if dev.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return a.steps * tokens / (time.perf_counter() - w0), a.steps * tokens / (time.process_time() - c0)

    for _ in range(a.warmup):
        bare_step()
        our_step()
    rows = []
    for r in range(a.rounds):
        if r % 2 == 0:
            b, o = timed(bare_step), timed(our_step)
        else:
            o, b = timed(our_step), timed(bare_step)
        rows.append((b, o))
        print(f"round {r}: wall: {names[0]} {b[0]:.0f} tok/s, {names[1]} {o[0]:.0f} tok/s, ratio {o[0] / b[0]:.3f}; "
              f"cpu: {names[0]} {b[1]:.0f}, {names[1]} {o[1]:.0f}, ratio {o[1] / b[1]:.3f}", flush=True)
    print(f"model {n_params / 1e6:.2f}M parameters (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}), "
          f"batch {a.batch}x{a.seq}, {a.device} {a.precision}, {torch.get_num_threads()} threads, loss settings: "
          f"{'Lumina 7B' if a.lumina_loss else 'defaults'}")
    for i, clock in enumerate(("wall", "cpu")):
        ratios = [o[i] / b[i] for b, o in rows]
        print(f"{clock} clock: median {names[0]} {statistics.median(b[i] for b, _ in rows):.0f} tok/s, {names[1]} "
              f"{statistics.median(o[i] for _, o in rows):.0f} tok/s, median ratio {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    if dev.type == "cuda":  # model FLOPs utilisation of each variant's median wall rate (the trainer's formula)
        from model.training.metrics import flops_per_token
        from model.training.planner import GPUS
        name = torch.cuda.get_device_name()
        peak = GPUS[next((g for g in ("H200", "H100", "A100") if g in name), "H100")][a.precision]
        fpt = flops_per_token(n_no_embed, a.layers, a.hidden, a.seq)
        print(f"MFU ({name}): {names[0]} {statistics.median(b[0] for b, _ in rows) * fpt / peak:.3f}, {names[1]} "
              f"{statistics.median(o[0] for _, o in rows) * fpt / peak:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

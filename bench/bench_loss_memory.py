"""Benchmark: peak memory of the LM head + loss (forward and backward), chunked vs naive full logits.

    python bench/bench_loss_memory.py                       # vocab 65536, 4096 tokens, hidden 256
    python bench/bench_loss_memory.py --hidden 512 --chunks 256 1024 4096 --repeats 3

What is measured: one sequence of ``--seq`` labelled tokens, hidden states [seq, hidden] and a head weight
[vocab, hidden] (fp32, CPU) exist before; then loss forward + backward (which also produce the hidden and
weight gradients, in every variant). The figure is the process's peak resident memory during that, minus
the resident memory just before it: Linux's VmHWM from /proc/self/status, reset beforehand by writing 5 to
/proc/self/clear_refs, in a fresh process per measurement (so no variant inherits another's heap).
Variants:
  naive_ce    logits = h @ W.T in fp32, F.cross_entropy (the minimal full-logits loss; what HF does)
  naive_full  the same loss as ours from full logits: CE + z-loss + image-logit masking (model.chameleon_lm.naive_lm_loss)
  chunked     ours: model.chameleon_lm.LMHeadWithLoss with --chunk rows per chunk (CE + z-loss + masking)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("bench_loss_memory")


def _status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


def measure(variant: str, vocab: int, seq: int, hidden: int, chunk: int) -> dict:
    """Runs in a fresh process: returns the peak extra MB of one loss forward + backward."""
    import torch
    import torch.nn.functional as F

    from model.chameleon_lm import LMHeadWithLoss, naive_lm_loss

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden_states = (torch.randn(1, seq, hidden, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(8196, vocab, (1, seq), generator=g)
    labels[0, seq // 4: seq // 4 + 1024] = torch.randint(4, 8196, (1024,), generator=g)  # an image block
    image_ids = torch.arange(4, 8196)
    head = LMHeadWithLoss(hidden, vocab, image_ids=image_ids, mask_image_logits=True, z_loss_weight=1e-5,
                          chunk_size=chunk)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
    open("/proc/self/clear_refs", "w").write("5")
    before = _status_mb()["VmRSS"]
    t0 = time.perf_counter()
    if variant == "chunked":
        out = head(hidden_states, labels)
        loss = out.loss / out.n_tokens
    else:
        logits = F.linear(hidden_states, head.weight).float()
        if variant == "naive_ce":
            loss = F.cross_entropy(logits[0, :-1], labels[0, 1:])
        else:
            parts = naive_lm_loss(logits, labels, image_ids=image_ids, mask_image_logits=True, z_loss_weight=1e-5)
            loss = parts.loss / parts.n_tokens
        del logits
    loss.backward()
    dt = time.perf_counter() - t0
    peak = _status_mb()["VmHWM"]
    return {"variant": variant, "chunk": chunk, "extra_mb": peak - before, "seconds": dt, "loss": float(loss)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary size (Chameleon: 65536)")
    p.add_argument("--seq", type=int, default=4096, help="labelled tokens in the sequence")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (the logits dominate either way)")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024], help="chunk sizes of the chunked loss")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process measurements per variant (median)")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(measure(**spec)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    specs = [("naive_ce", 0), ("naive_full", 0)] + [("chunked", c) for c in a.chunks]
    results: dict[tuple, list[dict]] = {s: [] for s in specs}
    for _ in range(a.repeats):  # interleaved, one fresh process each
        for variant, chunk in specs:
            spec = {"variant": variant, "vocab": a.vocab, "seq": a.seq, "hidden": a.hidden, "chunk": chunk}
            res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                 text=True, check=True)
            results[(variant, chunk)].append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["extra_mb"] for r in results[("naive_ce", 0)])
    print(f"vocab {a.vocab}, {a.seq} tokens, hidden {a.hidden}, fp32 CPU; median of {a.repeats} fresh processes")
    print("| variant | chunk | peak extra MB | vs naive_ce | seconds | loss |")
    print("|---|---|---|---|---|---|")
    for (variant, chunk), rs in results.items():
        mb = statistics.median(r["extra_mb"] for r in rs)
        sec = statistics.median(r["seconds"] for r in rs)
        print(f"| {variant} | {chunk or '-'} | {mb:.0f} | {mb / base:.3f}x | {sec:.2f} | {rs[0]['loss']:.4f} |")


if __name__ == "__main__":
    main()

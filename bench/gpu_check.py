"""The sections of bench/gpu_check.sh: CUDA paths that no CPU test covers. Each prints one result line.

    python bench/gpu_check.py train  --out DIR     # bf16 FSDP training of a ~1B config, vs the planner
    torchrun --nproc_per_node N bench/gpu_check.py nccl --out DIR     # nccl init + collectives
    python bench/gpu_check.py pretok --out DIR     # real-width VQGAN on CUDA: batched vs --batch_invariant
    python bench/gpu_check.py pinned --out DIR     # the trainer's DataLoader with pinned memory
    python bench/gpu_check.py resume --out DIR     # bf16 training on CUDA stopped and resumed: bitwise losses
    python bench/gpu_check.py generate --out DIR   # bench_generate.py in bf16: ours vs transformers vs Lumina loop
    python bench/gpu_check.py encode --out DIR     # bench_pretokenize.py: batched CUDA encode vs the Lumina loop
    python bench/gpu_check.py table RESULTS.jsonl  # the one table gpu_check.sh prints

Every section writes ``{"section", "ok", "metrics": {...}, "note"}`` as one JSON line on stdout (prefixed
``GPUCHECK ``); a failed check says why in ``note``. Nothing here runs without CUDA except ``table`` and
``--help``: gpu_check.sh skips everything, with a message, on a machine without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "nccl", "pretok", "pinned", "resume", "generate", "encode")
PREFIX = "GPUCHECK "

# ~1.08B parameters at Chameleon's vocabulary: hidden 2048, 16 layers, 16 heads, MLP 5504
TRAIN_CONFIG = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=65536)
TRAIN_SETTINGS = dict(batch_size=4, accum_iter=1, max_seq_len=2048, precision="bf16", checkpointing=False)


def emit(section: str, ok: bool, metrics: dict, note: str = "") -> None:
    print(PREFIX + json.dumps({"section": section, "ok": bool(ok), "metrics": metrics, "note": note}), flush=True)


def train_config():
    from transformers import ChameleonConfig

    from model.training.planner import chameleon_vocabulary_map

    cfg = ChameleonConfig(**TRAIN_CONFIG, vocabulary_map=chameleon_vocabulary_map(TRAIN_CONFIG["vocab_size"]))
    cfg._attn_implementation = "sdpa"
    return cfg


def _gpu_name() -> str:
    name = torch.cuda.get_device_name()
    return next((g for g in ("H200", "H100", "A100") if g in name), "H100")


def section_train(a) -> None:
    """bf16 FSDP (1 rank, nccl) training steps of a ~1B config: tokens/s, MFU, peak memory vs the plan."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(REPO / "bench"))
    from bench_planner import materialize_random
    from bench_train_step import load_solver
    from model.chameleon_lm import build_chameleon_lm
    from model.training.metrics import flops_per_token
    from model.training.optim import build_optimizer
    from model.training.parallelize import parallelize
    from model.training.planner import GPUS, Model, Settings, plan_memory

    fs = load_solver()
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(29600 + os.getpid() % 1000))):
        os.environ.setdefault(k, v)  # one rank, started without torchrun
    t0 = time.perf_counter()
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    t_init = time.perf_counter() - t0
    cfg = train_config()
    st = Settings(**TRAIN_SETTINGS, world_size=1)
    lm = build_chameleon_lm(cfg, device="meta")
    parallelize(lm, init_device_mesh("cuda", (1,)), precision=st.precision, checkpointing=st.checkpointing)
    materialize_random(lm, "cuda")
    opt = build_optimizer(lm, lr=1e-5, weight_decay=0.1)
    args = fs.parse_args(["--data_config", __file__, "--precision", st.precision, "--batch_size", str(st.batch_size),
                          "--accum_iter", str(st.accum_iter)])
    n_no_embed = sum(p.numel() for p in lm.parameters()) - lm.model.embed_tokens.weight.numel()
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(8196, cfg.vocab_size, (st.batch_size, st.max_seq_len), generator=g)
        return {"input_ids": ids, "labels": ids.clone(), "n_real_tokens": torch.tensor(ids.numel())}

    dev = torch.device("cuda", 0)
    for _ in range(2):  # warm-up; the AdamW states exist from the first step on
        fs.train_step(lm, opt, [batch()], a=args, device=dev, lr=1e-5, n_params_no_embed=n_no_embed)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    steps = a.steps
    t0 = time.perf_counter()
    for _ in range(steps):
        m = fs.train_step(lm, opt, [batch()], a=args, device=dev, lr=1e-5, n_params_no_embed=n_no_embed)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = st.batch_size * st.max_seq_len
    flops = tokens * flops_per_token(n_no_embed, cfg.num_hidden_layers, cfg.hidden_size, st.max_seq_len)
    gpu = _gpu_name()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    plan = plan_memory(Model.from_config(cfg, "gpu_check"), st, on_gpu=False)
    pred = plan["allocated_peak_bytes"]
    emit("train", abs(peak / pred - 1) <= 0.15 and np.isfinite(m["loss"]), {
        "params": sum(p.numel() for p in lm.parameters()), "nccl_init_s": round(t_init, 2),
        "tokens_per_s": round(tokens / dt), "mfu": round(flops / dt / GPUS[gpu]["bf16"], 3), "gpu": gpu,
        "peak_allocated_gb": round(peak / 1e9, 2), "predicted_gb": round(pred / 1e9, 2),
        "measured_over_predicted": round(peak / pred, 3), "peak_reserved_gb": round(reserved / 1e9, 2),
        "loss": round(m["loss"], 4)},
        f"batch {st.batch_size} x {st.max_seq_len}, bf16, fsdp, {steps} steps timed; goal: peak within 15% of plan")
    dist.destroy_process_group()


def section_nccl(a) -> None:
    """nccl initialisation and the collectives FSDP uses, on every visible GPU (under torchrun)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    t0 = time.perf_counter()
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    dist.barrier()
    t_init = time.perf_counter() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((1 << 20,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    ok = bool((x == world * (world + 1) / 2).all())
    out = torch.empty(world << 20, device="cuda")
    dist.all_gather_into_tensor(out, torch.full((1 << 20,), float(rank), device="cuda"))
    ok &= bool((out.view(world, -1)[:, 0] == torch.arange(world, device="cuda", dtype=out.dtype)).all())
    rs = torch.empty(1 << 20, device="cuda")
    dist.reduce_scatter_tensor(rs, torch.ones(world << 20, device="cuda"))
    ok &= bool((rs == world).all())
    torch.cuda.synchronize()
    if rank == 0:
        emit("nccl", ok, {"ranks": world, "init_s": round(t_init, 2)},
             "all_reduce, all_gather_into_tensor, reduce_scatter_tensor checked")
    dist.destroy_process_group()


def section_pretok(a) -> None:
    """pre_tokenize.py on CUDA with the real-width VQGAN: whole batches vs --batch_invariant."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_pretokenize import make_bundle, make_images

    out = Path(a.out) / "pretok"
    imgs = out / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(out / "bundle")
    data = make_images(imgs, a.images, 512)
    res = {}
    for name, flag in (("batched", "--no_batch_invariant"), ("batch_invariant", "--batch_invariant")):
        d = out / name
        cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(data), "--out_dir", str(d),
               "--tokenizer_dir", str(bundle), "--target_size", "512", "--batch_size", "8", "--num_workers", "2",
               "--device", "cuda", "--no_progress", flag]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        res[name] = (time.perf_counter() - t0, np.fromfile(d / "0-of-1-tokens.bin", dtype="<i4", offset=16))
    (t_b, tok_b), (t_i, tok_i) = res["batched"], res["batch_invariant"]
    codes = ((tok_b >= 4) & (tok_b <= 8195)) | ((tok_i >= 4) & (tok_i <= 8195))
    same = float((tok_b[codes] == tok_i[codes]).mean()) if tok_b.shape == tok_i.shape and codes.any() else 0.0
    emit("pretok", tok_b.shape == tok_i.shape and same > 0.99, {
        "images": a.images, "batched_images_per_s": round(a.images / t_b, 2),
        "batch_invariant_images_per_s": round(a.images / t_i, 2), "share_of_codes_equal": round(same, 5)},
        "512 px, batch 8, whole command timed (process start and model load included)")


def write_records(d: Path, n: int = 256, seed: int = 0) -> Path:
    """A data config over ``n`` random pre-tokenized items (our shard format), every token labelled."""
    from data.records import Record, ShardWriter, record_name, shard_name

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    with ShardWriter(d / shard_name(0, 1)) as w:
        for k in range(n):
            toks = [0] + rng.integers(9100, 9300, size=int(rng.integers(24, 64))).tolist()
            off = w.append(toks, toks)
            lines.append(Record(id=k, file=shard_name(0, 1), len=len(toks), offset=off).to_json())
    (d / record_name(0, 1)).write_text("".join(x + "\n" for x in lines))
    (d / "data.yaml").write_text(f"META:\n  - path: {record_name(0, 1)}\n")
    return d / "data.yaml"


def section_pinned(a) -> None:
    """The trainer's DataLoader with --pin_mem on a CUDA machine: pinned batches, async copies."""
    from data.loader import build_train_data

    cfg = write_records(Path(a.out) / "pinned")
    res = {}
    for pin in (True, False):
        data = build_train_data(cfg, max_seq_len=64, micro_batch_size=8, accum_iter=1, world_size=1, rank=0, seed=0,
                                num_workers=2, pin_mem=pin, pad_id=1)
        data.sampler.set_epoch(0)
        pinned, n, t0 = True, 0, time.perf_counter()
        for micro in data.loader:
            for b in micro if isinstance(micro, list) else [micro]:
                pinned &= bool(b["input_ids"].is_pinned())
                b["input_ids"].to("cuda", non_blocking=True)
                n += 1
        torch.cuda.synchronize()
        res[pin] = (pinned, n, time.perf_counter() - t0)
    emit("pinned", res[True][0] and not res[False][0] and res[True][1] > 0, {
        "batches": res[True][1], "pinned": res[True][0], "pinned_batches_per_s": round(res[True][1] / res[True][2], 1),
        "unpinned_batches_per_s": round(res[False][1] / res[False][2], 1)}, "2 workers, batch 8 x <= 64 tokens")


def section_resume(a) -> None:
    """bf16 training on CUDA, stopped at step 2 and resumed, against an uninterrupted run: bitwise losses."""
    from model.tokenizer.tiny_bundle import make_tiny_bundle
    from model.make_tiny_model import make_tiny_model

    root = Path(a.out) / "resume"
    bundle = make_tiny_bundle(root / "bundle", seed=0)
    model = make_tiny_model(bundle, root / "model", seed=0)
    cfg = write_records(root / "data", n=64)

    def solve(out: Path, steps: int) -> None:
        cmd = [sys.executable, "finetune_solver.py", "--init_from", str(model), "--data_config", str(cfg),
               "--output_dir", str(out), "--precision", "bf16", "--batch_size", "4", "--accum_iter", "1",
               "--num_workers", "0", "--log_every", "1", "--lr", "1e-3", "--max_steps", str(steps),
               "--save_iteration_interval", "2", "--dropout", "0.1", "--no_export_hf"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True,
                       env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)})

    def losses(out: Path) -> dict:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    solve(root / "full", 4)
    solve(root / "stopped", 2)
    solve(root / "stopped", 4)  # resumes from epoch0-iter2
    full, resumed = losses(root / "full"), losses(root / "stopped")
    same = [full.get(s) == resumed.get(s) for s in (3, 4)]
    emit("resume", all(same) and len(full) >= 4, {"steps_compared": 2, "bitwise_equal": all(same),
                                                  "loss_step4": full.get(4)},
         "tiny model, bf16 on CUDA, dropout 0.1, stop at step 2, resume, steps 3-4 compared with ==")


def _bench(section: str, a, cmd: list[str]) -> subprocess.CompletedProcess:
    """Runs one of bench/'s scripts on CUDA; its whole output goes to {out}/{section}_bench.log."""
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (Path(a.out) / f"{section}_bench.log").write_text(r.stdout + r.stderr)
    return r


def _first_table(text: str) -> list[list[str]]:
    """The body rows (cells) of the first markdown table in ``text``."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set(cells[0]) <= set("-") and cells[0] != "method":
                rows.append(cells)
        elif started:
            break
    return rows


def section_generate(a) -> None:
    """bench/bench_generate.py in bf16 on CUDA: image tokens/s of ours vs transformers generate with Lumina's
    processors vs a Lumina-style two-forward loop, batch 1 with CFG (issue 10's comparison on a GPU)."""
    r = _bench("generate", a, [sys.executable, "bench/bench_generate.py", "--device", "cuda", "--precision", "bf16",
                               "--reps", "3", "--batch_sizes", "1,8,32"])
    metrics = {}
    for cells in _first_table(r.stdout):  # | method | tokens/s (wall) | tokens/CPU-s | ours / method (wall) | ...
        metrics[f"{cells[0]} tokens_per_s"] = cells[1].split()[0]
        metrics[f"ours / {cells[0]}"] = cells[3]
    emit("generate", r.returncode == 0 and bool(metrics), metrics,
         f"bench_generate.py defaults, bf16, cfg 4; goals >= 1.0x transformers, >= 1.8x Lumina loop; "
         f"batch scaling in {Path(a.out) / 'generate_bench.log'}")


def section_encode(a) -> None:
    """bench/bench_pretokenize.py --device cuda: the real-width VQGAN encode in whole batches on CUDA (and
    pre_tokenize.py) vs the per-item Lumina loop, images/s (issue 15's GPU goal: >= 3x)."""
    out = Path(a.out) / "encode.json"
    r = _bench("encode", a, [sys.executable, "bench/bench_pretokenize.py", "--device", "cuda", "--images",
                             str(a.images), "--batch_size", "16", "--out", str(out)])
    metrics = {}
    if r.returncode == 0 and out.is_file():
        rep = json.loads(out.read_text())["repeats"][-1]
        metrics = {f"{name} images_per_s": round(v["images_per_s"], 2) for name, v in rep["results"].items()}
        metrics.update({f"{name} vs lumina loop": f"{v:.2f}x" for name, v in rep["vs_lumina_loop"].items()})
    emit("encode", bool(metrics), metrics, f"{a.images} images, 256 px crops, batch 16; goal >= 3x the Lumina loop")


def table(path: str) -> str:
    """The one table of gpu_check.sh from its results file (missing sections are listed as not run)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith(PREFIX):
            r = json.loads(line[len(PREFIX):])
            rows[r["section"]] = r
    out = ["| check | result | figures | note |", "|---|---|---|---|"]
    for s in SECTIONS:
        r = rows.get(s)
        if r is None:
            out.append(f"| {s} | NOT RUN | - | failed or timed out before reporting (see its log) |")
            continue
        figs = ", ".join(f"{k} {v}" for k, v in r["metrics"].items())
        out.append(f"| {s} | {'ok' if r['ok'] else 'FAILED'} | {figs} | {r['note']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=SECTIONS + ("table",), help="what to run")
    p.add_argument("results", nargs="?", help="for table: the results file (GPUCHECK lines)")
    p.add_argument("--out", default="gpu_check_out", help="working directory for the section's files")
    p.add_argument("--steps", type=int, default=8, help="train: timed steps")
    p.add_argument("--images", type=int, default=32, help="pretok: images to pre-tokenize per method")
    a = p.parse_args(argv)
    if a.section == "table":
        if not a.results:
            p.error("table needs the results file")
        print(table(a.results))
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check.py {a.section}: no CUDA GPU, nothing to check", file=sys.stderr)
        return 77
    Path(a.out).mkdir(parents=True, exist_ok=True)
    {"train": section_train, "nccl": section_nccl, "pretok": section_pretok, "pinned": section_pinned,
     "resume": section_resume, "generate": section_generate, "encode": section_encode}[a.section](a)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

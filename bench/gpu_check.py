"""The checks of bench/gpu_check.sh: the CUDA paths that no CPU test covers, each in its own process, one table.

    python bench/gpu_check.py run [--only nccl,train] [--budget 360] [--out DIR]   # what gpu_check.sh runs
    python bench/gpu_check.py run --rehearse-cpu     # every check end to end on the CPU, tiny sizes (CI)
    python bench/gpu_check.py train [--rehearse-cpu] # one check alone (its GPUCHECK line on stdout)
    torchrun --nproc_per_node N bench/gpu_check.py nccl
    python bench/gpu_check.py table LOG...           # the table from the GPUCHECK lines of logs

``run`` starts the checks in the order of ``CHECKS`` (fast and fundamental first), each as a child process
under its own time limit, and starts none after ``--budget`` seconds (each check's limit is cut to what is
left of it), so a whole run ends within the budget plus a few seconds. For each check it writes
``NAME.log`` (the child's whole output) under ``--out``; a check that fails has the last lines of its log
printed. ``table.md`` (the preflight, the table, the failures' last lines, the raw results) is rewritten
after every check, so a run cut short still leaves its table. Nothing else goes under ``--out``: bundles,
images, checkpoints live in a scratch directory (``--work``) that ``run`` deletes.

``--rehearse-cpu`` runs the same sections with the same code paths and arguments on the CPU at tiny sizes:
bf16 where the GPU run uses bf16 (autocast/FSDP mixed precision on the CPU), gloo where it uses nccl. It
proves the plumbing (arguments, imports, output parsing), not the figures.

Adding a row (e.g. a compiled variant): write ``section_NAME(w, s)`` that ends with ``emit(NAME, ...)``, add
its sizes to ``Sizes`` (and tiny ones to ``REHEARSAL``) if it needs any, and one ``Check("NAME", ...)`` line to
``CHECKS`` (its place there is its place in the run; gpu_check.sh reads the list from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PREFIX = "GPUCHECK "
TAIL_LINES = 15          # lines of a failed check's log printed and put in table.md
MAX_LOG_BYTES = 4 << 20  # a log longer than this keeps its last 4 MB (16 MB come back per file)
MAX_FILES = 8            # files the device returns from $OUT: table.md + at most 7 logs, else one checks.log
# torch / transformers this stack was tested with: the pinned versions and the device image's (README)
SUPPORTED = {"torch": ("2.11", "2.13"), "transformers": ("5.17", "5.23")}


@dataclass(frozen=True)
class Check:
    name: str
    limit_s: int  # time limit on a GPU; the CPU rehearsal gets REHEARSAL_LIMIT_FACTOR times it
    what: str
    torchrun: bool = False


# Order: fast and fundamental first, so that a short or broken run still says the most.
CHECKS = (
    Check("nccl", 40, "nccl init and the collectives FSDP uses on every visible GPU (torchrun)", torchrun=True),
    Check("pinned", 30, "the trainer's DataLoader with --pin_mem: batches pinned, copied asynchronously"),
    Check("train", 90, "bf16 FSDP steps of a ~1B config (vocab 65536): tokens/s, MFU, peak memory vs the planner"),
    Check("resume", 75, "finetune_solver.py bf16 --deterministic, resumed from step 2 of 4: losses bitwise equal"),
    Check("generate", 90, "bench_generate.py bf16: ours vs transformers generate vs a Lumina loop"),
    Check("pretok", 60, "pre_tokenize.py, real-width VQGAN: whole batches vs --batch_invariant"),
    Check("encode", 60, "bench_pretokenize.py: batched VQGAN encode vs the per-item Lumina loop"),
    Check("compile_train", 120, "bench_train_step.py --compile bf16: compiled decoder layers vs eager, tokens/s, MFU"),
    Check("compile_generate", 120, "bench_generate.py --compile bf16: static cache + compiled step vs eager and "
          "the Lumina baselines, batch 1 and 8"),
)
SECTIONS = tuple(c.name for c in CHECKS)
REHEARSAL_LIMIT_FACTOR = 4
DEFAULT_BUDGET_S = {"gpu": 360, "cpu": 900}

# ~1.08B parameters at Chameleon's vocabulary: hidden 2048, 16 layers, 16 heads, MLP 5504
TRAIN_CONFIG = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=65536)
TRAIN_SETTINGS = dict(batch_size=4, accum_iter=1, max_seq_len=2048, precision="bf16", checkpointing=False)


@dataclass(frozen=True)
class Sizes:
    """What each check does on a GPU; ``REHEARSAL`` below is the same at tiny sizes for the CPU."""
    train_config: dict = field(default_factory=lambda: dict(TRAIN_CONFIG))
    train_settings: dict = field(default_factory=lambda: dict(TRAIN_SETTINGS))
    train_warmup: int = 2  # steps before the timed ones (allocator, kernels, AdamW states)
    train_steps: int = 8
    pinned_items: int = 2048
    resume_items: int = 64
    generate_args: tuple = ("--precision", "bf16", "--reps", "2", "--batch_sizes", "1,8")
    pretok_images: int = 64
    pretok_px: int = 512
    pretok_batch: int = 8
    pretok_vqgan: str = "real"  # real-width VQGAN ("real") or the tiny bundle's ("tiny")
    encode_args: tuple = ("--images", "48", "--batch_size", "16")  # bench_pretokenize needs >= 3 x batch
    compile_train_args: tuple = ("--vocab", "65536", "--hidden", "2048", "--layers", "12", "--heads", "16",
                                 "--batch", "2", "--seq", "4096", "--rounds", "5", "--steps", "3")


REHEARSAL = Sizes(
    train_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=65536),
    train_settings=dict(TRAIN_SETTINGS, batch_size=2, max_seq_len=64),
    train_warmup=1, train_steps=2, pinned_items=64, resume_items=32,
    generate_args=("--precision", "bf16", "--reps", "1", "--batch_sizes", "1,2", "--hidden", "64", "--layers",
                   "2", "--heads", "4", "--resolution", "64x64"),
    pretok_images=6, pretok_px=96, pretok_batch=2, pretok_vqgan="tiny",
    encode_args=("--images", "6", "--batch_size", "2", "--image_px", "64", "--target_size", "64", "--vqgan", "tiny",
                 "--threads", "1"),
    compile_train_args=("--vocab", "8704", "--hidden", "64", "--layers", "2", "--heads", "4", "--batch", "1",
                        "--seq", "64", "--rounds", "1", "--steps", "1", "--warmup", "1"))


@dataclass(frozen=True)
class Where:
    """Where a section runs: the device and collective backend, and its scratch directory."""
    device: torch.device
    backend: str
    rehearse: bool
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class ChildFailed(RuntimeError):
    """A command a check ran exited non-zero; the message ends with the last lines of its output."""


def emit(section: str, ok: bool, metrics: dict, note: str = "") -> None:
    print(PREFIX + json.dumps({"section": section, "ok": bool(ok), "metrics": metrics, "note": note}), flush=True)


def child_env() -> dict:
    """The environment of every command a check starts: the repo importable, offline, no launcher variables
    (a lone finetune_solver.py then rendezvouses in memory, never on a port another check holds)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    path = env.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_child(cmd: list[str], title: str) -> str:
    """Runs ``cmd`` from the repo root; its output goes into this check's log (our stdout). Raises
    ChildFailed with the last lines of that output when it exits non-zero."""
    print(f"--- {title}: {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(r.stdout, flush=True)
    if r.returncode:
        tail = "\n".join(r.stdout.rstrip().splitlines()[-TAIL_LINES:])
        raise ChildFailed(f"{title} exited with code {r.returncode}; its last lines:\n{tail}")
    return r.stdout


# ----------------------------------------------------------------------------------------------------------
# the checks


def train_config(s: Sizes | None = None):
    from transformers import ChameleonConfig

    from model.training.planner import chameleon_vocabulary_map

    c = (s or Sizes()).train_config
    cfg = ChameleonConfig(**c, vocabulary_map=chameleon_vocabulary_map(c["vocab_size"]))
    cfg._attn_implementation = "sdpa"
    return cfg


def _gpu_name() -> str:
    name = torch.cuda.get_device_name()
    return next((g for g in ("H200", "H100", "A100") if g in name), "H100")


def section_nccl(w: Where, s: Sizes) -> None:
    """nccl (gloo in the rehearsal) initialisation and the collectives FSDP uses, on every rank (torchrun)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    t0 = time.perf_counter()
    if w.cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    dist.barrier()
    t_init = time.perf_counter() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((1 << 20,), float(rank + 1), device=dev)
    dist.all_reduce(x)
    checks = {"all_reduce": bool((x == world * (world + 1) / 2).all())}
    out = torch.empty(world << 20, device=dev)
    dist.all_gather_into_tensor(out, torch.full((1 << 20,), float(rank), device=dev))
    checks["all_gather_into_tensor"] = bool((out.view(world, -1)[:, 0] == torch.arange(world, device=dev)).all())
    rs = torch.empty(1 << 20, device=dev)
    dist.reduce_scatter_tensor(rs, torch.ones(world << 20, device=dev))
    checks["reduce_scatter_tensor"] = bool((rs == world).all())
    w.sync()
    if rank == 0:
        bad = [k for k, v in checks.items() if not v]
        emit("nccl", not bad, {"ranks": world, "backend": dist.get_backend(), "init_s": round(t_init, 2)},
             "wrong result: " + ", ".join(bad) if bad else ", ".join(checks) + " checked")
    dist.destroy_process_group()


def write_records(d: Path, n: int = 256, seed: int = 0) -> Path:
    """A data config over ``n`` random pre-tokenized items (our shard format), every token labelled."""
    from data.records import Record, ShardWriter, record_name, shard_name

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    with ShardWriter(d / shard_name(0, 1)) as wr:
        for k in range(n):
            toks = [0] + rng.integers(9100, 9300, size=int(rng.integers(24, 64))).tolist()
            off = wr.append(toks, toks)
            lines.append(Record(id=k, file=shard_name(0, 1), len=len(toks), offset=off).to_json())
    (d / record_name(0, 1)).write_text("".join(x + "\n" for x in lines))
    (d / "data.yaml").write_text(f"META:\n  - path: {record_name(0, 1)}\n")
    return d / "data.yaml"


def section_pinned(w: Where, s: Sizes) -> None:
    """The trainer's DataLoader with --pin_mem on and off: pinned batches, async copies; batches/s after
    the first batch (worker start-up excluded)."""
    from data.loader import build_train_data

    cfg = write_records(w.work / "pinned", n=s.pinned_items)
    res = {}
    for pin in (True, False):
        data = build_train_data(cfg, max_seq_len=64, micro_batch_size=8, accum_iter=1, world_size=1, rank=0, seed=0,
                                num_workers=2, pin_mem=pin, pad_id=1)
        data.sampler.set_epoch(0)
        pinned, n, t_first = True, 0, 0.0
        for micro in data.loader:
            for b in micro if isinstance(micro, list) else [micro]:
                pinned &= bool(b["input_ids"].is_pinned())
                b["input_ids"].to(w.device, non_blocking=True)
                n += 1
                if n == 1:
                    w.sync()
                    t_first = time.perf_counter()
        w.sync()
        res[pin] = (pinned, n, (n - 1) / max(time.perf_counter() - t_first, 1e-9))
    if w.cuda:
        ok, note = res[True][0] and not res[False][0] and res[True][1] > 1, "pinned with --pin_mem, not without"
    else:  # no accelerator: DataLoader does not pin; the rehearsal checks the plumbing only
        ok, note = res[True][1] > 1 and not res[True][0], "CPU rehearsal: nothing is pinned without an accelerator"
    emit("pinned", ok, {"batches": res[True][1], "pinned": res[True][0],
                        "pinned_batches_per_s": round(res[True][2], 1),
                        "unpinned_batches_per_s": round(res[False][2], 1)},
         f"2 workers, batch 8 x <= 64 tokens, rate after the first batch; {note}")


def section_train(w: Where, s: Sizes) -> None:
    """bf16 FSDP (1 rank) training steps: steady tokens/s, MFU and peak memory against the planner."""
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
    t0 = time.perf_counter()
    dist.init_process_group(w.backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": w.device} if w.cuda else {}))
    t_init = time.perf_counter() - t0
    cfg = train_config(s)
    st = Settings(**s.train_settings, world_size=1)
    lm = build_chameleon_lm(cfg, device="meta")
    parallelize(lm, init_device_mesh(w.device.type, (1,)), precision=st.precision, checkpointing=st.checkpointing)
    materialize_random(lm, str(w.device))
    opt = build_optimizer(lm, lr=1e-5, weight_decay=0.1)
    args = fs.parse_args(["--data_config", __file__, "--precision", st.precision, "--batch_size", str(st.batch_size),
                          "--accum_iter", str(st.accum_iter)])
    n_params = sum(p.numel() for p in lm.parameters())
    n_no_embed = n_params - lm.model.embed_tokens.weight.numel()
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(8196, cfg.vocab_size, (st.batch_size, st.max_seq_len), generator=g)
        return {"input_ids": ids, "labels": ids.clone(), "n_real_tokens": torch.tensor(ids.numel())}

    def step():
        return fs.train_step(lm, opt, [batch()], a=args, device=w.device, lr=1e-5, n_params_no_embed=n_no_embed)

    for _ in range(s.train_warmup):  # the AdamW states exist from the first step on
        step()
    w.sync()
    if w.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(s.train_steps):
        m = step()
    w.sync()
    dt = (time.perf_counter() - t0) / s.train_steps
    tokens = st.batch_size * st.max_seq_len
    metrics = {"params": n_params, "init_s": round(t_init, 2), "tokens_per_s": round(tokens / dt),
               "loss": round(m["loss"], 4)}
    ok = bool(np.isfinite(m["loss"]))
    notes = [f"batch {st.batch_size} x {st.max_seq_len}, {st.precision}, fsdp, {s.train_steps} steps timed after "
             f"{s.train_warmup}"]
    if w.cuda:
        gpu = _gpu_name()
        flops = tokens * flops_per_token(n_no_embed, cfg.num_hidden_layers, cfg.hidden_size, st.max_seq_len)
        metrics.update(gpu=gpu, mfu=round(flops / dt / GPUS[gpu]["bf16"], 3),
                       peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                       peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2))
    dist.destroy_process_group()
    try:  # the figures above are reported even when the planner fails
        pred = plan_memory(Model.from_config(cfg, "gpu_check"), st, on_gpu=False)["allocated_peak_bytes"]
    except Exception as e:  # noqa: BLE001 - any planner error is a finding, not a crash
        traceback.print_exc()
        emit("train", False, metrics, "; ".join(notes + [f"planning failed: {type(e).__name__}: {e}"]))
        return
    metrics["predicted_gb"] = round(pred / 1e9, 2)
    if w.cuda:
        ratio = torch.cuda.max_memory_allocated() / pred
        metrics["measured_over_predicted"] = round(ratio, 3)
        ok &= abs(ratio - 1) <= 0.15
        notes.append("goal: peak within 15% of plan")
    else:
        notes.append("CPU rehearsal: no memory goal")
    emit("train", ok, metrics, "; ".join(notes))


def section_resume(w: Where, s: Sizes) -> None:
    """finetune_solver.py in bf16 with --deterministic: a run of 4 steps (checkpoints at steps 2 and 4), then
    a run resumed from its step-2 checkpoint: the losses of steps 3 and 4 compared with ==. Deterministic
    kernels make a difference a resume bug, not run-to-run noise."""
    from model.make_tiny_model import make_tiny_model
    from model.tokenizer.tiny_bundle import make_tiny_bundle

    root = w.work / "resume"
    bundle = make_tiny_bundle(root / "bundle", seed=0)
    model = make_tiny_model(bundle, root / "model", seed=0)
    cfg = write_records(root / "data", n=s.resume_items)

    def solve(out: Path, *extra: str) -> dict:
        run_child([sys.executable, "finetune_solver.py", "--init_from", str(model), "--data_config", str(cfg),
                   "--output_dir", str(out), "--precision", "bf16", "--deterministic", "--batch_size", "4",
                   "--accum_iter", "1", "--num_workers", "0", "--log_every", "1", "--lr", "1e-3",
                   "--max_steps", "4", "--save_iteration_interval", "2", "--dropout", "0.1", "--no_export_hf",
                   *extra], f"finetune_solver.py {out.name}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    full = solve(root / "full")
    resumed = solve(root / "resumed", "--resume_path", str(root / "full" / "epoch0-iter2"))
    same = [full.get(k) is not None and full.get(k) == resumed.get(k) for k in (3, 4)]
    ok = all(same) and 1 not in resumed  # the resumed run starts at step 3
    emit("resume", ok, {"steps_compared": 2, "bitwise_equal": all(same), "loss_step3": full.get(3),
                        "loss_step4": full.get(4), "resumed_step4": resumed.get(4)},
         f"tiny model, bf16 --deterministic on {w.device.type}, dropout 0.1, resumed from step 2 of a 4-step run, "
         f"steps 3-4 compared with ==")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The body rows (cells) of each markdown table in ``text``: its header and separator rows dropped."""
    tables, rows = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if rows is None:  # the header
            rows = []
            tables.append(rows)
        elif not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return tables


def section_generate(w: Where, s: Sizes) -> None:
    """bench/bench_generate.py in bf16: image tokens/s of ours vs transformers generate with Lumina's processors
    vs a Lumina-style two-forward loop, batch 1 with CFG (medians after a warm-up), and ours at batch 8."""
    text = run_child([sys.executable, "bench/bench_generate.py", "--device", w.device.type, *s.generate_args],
                     "bench_generate.py")
    tables = markdown_tables(text)
    if len(tables) < 2 or not tables[0]:
        raise ChildFailed("bench_generate.py printed no result tables")
    metrics = {}
    for cells in tables[0]:  # | method | tokens/s (wall) | tokens/CPU-s | ours / method (wall) | ...
        name = cells[0].split(" (")[0] if cells[0].startswith("ours") else cells[0][:3].strip()
        metrics[f"{name} tokens_per_s"] = float(cells[1].split()[0])
        if not cells[0].startswith("ours"):
            metrics[f"ours vs {name}"] = cells[3]
    for cells in tables[1]:  # | samples per batch | tokens/s (wall) | ...
        metrics[f"ours batch {cells[0]} tokens_per_s"] = float(cells[1])
    emit("generate", True, metrics, "(a) transformers generate + Lumina processors, (b) Lumina-style loop; "
         f"{' '.join(s.generate_args)}, cfg 4; goals >= 1.0x (a), >= 1.8x (b)")


def section_pretok(w: Where, s: Sizes) -> None:
    """pre_tokenize.py: whole batches vs --batch_invariant, images/s in steady state (read off the record file
    as it grows, the first batch excluded), and the share of image codes equal between the two."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_pretokenize import bench_script, make_bundle, make_images, rate
    from model.tokenizer.tiny_bundle import make_tiny_bundle

    out = w.work / "pretok"
    (out / "images").mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(out / "bundle") if s.pretok_vqgan == "real" else make_tiny_bundle(out / "bundle", seed=0)
    data = make_images(out / "images", s.pretok_images, s.pretok_px)
    opts = SimpleNamespace(target_size=s.pretok_px, batch_size=s.pretok_batch, num_workers=2,
                           device=w.device.type, threads=0)
    res = {}
    for name, flag in (("batched", "--no_batch_invariant"), ("batch_invariant", "--batch_invariant")):
        times, cmd, log = bench_script(data, bundle, out / name, opts, flag)
        print(f"--- pre_tokenize.py {flag}: {cmd}\n{log}", flush=True)
        toks = np.fromfile(out / name / "0-of-1-tokens.bin", dtype="<i4", offset=16)
        res[name] = (rate(times, s.pretok_batch), toks)
    (r_b, tok_b), (r_i, tok_i) = res["batched"], res["batch_invariant"]
    codes = ((tok_b >= 4) & (tok_b <= 8195)) | ((tok_i >= 4) & (tok_i <= 8195))
    same = float((tok_b[codes] == tok_i[codes]).mean()) if tok_b.shape == tok_i.shape and codes.any() else 0.0
    emit("pretok", tok_b.shape == tok_i.shape and same > 0.99, {
        "images": s.pretok_images, "batched_images_per_s": round(r_b, 2),
        "batch_invariant_images_per_s": round(r_i, 2), "share_of_codes_equal": round(same, 5)},
        f"{s.pretok_vqgan}-width VQGAN, {s.pretok_px} px, batch {s.pretok_batch}, 2 workers; steady state (first "
        f"batch excluded)")


def section_encode(w: Where, s: Sizes) -> None:
    """bench/bench_pretokenize.py on the device: the VQGAN encode in whole batches (and pre_tokenize.py) vs the
    per-item Lumina loop, images/s in steady state, both in strict fp32 (issue 15's GPU goal: >= 3x)."""
    out = w.work / "encode.json"
    run_child([sys.executable, "bench/bench_pretokenize.py", "--device", w.device.type, *s.encode_args,
               "--out", str(out)], "bench_pretokenize.py")
    rep = json.loads(out.read_text())["repeats"][-1]
    metrics = {f"{name} images_per_s": round(v["images_per_s"], 2) for name, v in rep["results"].items()}
    metrics.update({f"{name} vs lumina loop": f"{v:.2f}x" for name, v in rep["vs_lumina_loop"].items()
                    if name != "lumina loop"})
    n, total = rep["codes_differing"]["lumina loop vs ours"]
    metrics["codes differing, lumina loop vs ours"] = f"{n} of {total}"
    emit("encode", bool(metrics), metrics, f"{' '.join(s.encode_args)}, 256 px crops unless given; both loops in "
         f"strict fp32 (no TF32); goal >= 3x the Lumina loop")


def section_compile_train(w: Where, s: Sizes) -> None:
    """bench/bench_train_step.py --compile in bf16: the trainer's step with each decoder layer compiled
    (finetune_solver.py --compile) vs eager, interleaved rounds; tokens/s, their ratio and MFU (on a GPU)."""
    text = run_child([sys.executable, "bench/bench_train_step.py", "--compile", "--device", w.device.type,
                      "--precision", "bf16", *s.compile_train_args], "bench_train_step.py --compile")
    m = re.search(r"wall clock: median eager (\d+) tok/s, compiled (\d+) tok/s, median ratio ([\d.]+)", text)
    if m is None:
        raise ChildFailed("bench_train_step.py printed no wall-clock summary")
    metrics = {"eager tokens_per_s": int(m[1]), "compiled tokens_per_s": int(m[2]), "compiled vs eager": float(m[3])}
    if c := re.search(r"first step \(compiling\): ([\d.]+) s", text):
        metrics["compile_s"] = float(c[1])
    if u := re.search(r"MFU \([^)]*\): eager ([\d.]+), compiled ([\d.]+)", text):
        metrics |= {"MFU eager": float(u[1]), "MFU compiled": float(u[2])}
    emit("compile_train", True, metrics, f"{' '.join(s.compile_train_args)}, bf16; torchtitan reports about +16% "
         "tokens/s from per-block compile on H100")


def section_compile_generate(w: Where, s: Sizes) -> None:
    """bench/bench_generate.py --compile in bf16: Generator(compile=True) (static KV cache, compiled decode step)
    vs eager ours and the two Lumina baselines at batch 1 with CFG, and compiled vs eager per batch size."""
    text = run_child([sys.executable, "bench/bench_generate.py", "--device", w.device.type, "--compile",
                      *s.generate_args], "bench_generate.py --compile")
    tables = markdown_tables(text)
    if len(tables) < 2 or not tables[0]:
        raise ChildFailed("bench_generate.py printed no result tables")
    metrics = {}
    # | method | tokens/s (wall) | tokens/CPU-s | ours / method (wall) | (CPU) | ours --compile / method (wall) | ...
    for cells in tables[0]:
        if cells[0].startswith("ours --compile"):
            metrics["compiled tokens_per_s"] = float(cells[1].split()[0])
        elif not cells[0].startswith("ours"):
            metrics[f"compiled vs {cells[0][:3].strip()}"] = cells[5]
    for cells in tables[1]:  # | samples per batch | ... | compiled / eager (wall) | compiled / eager (CPU) |
        metrics[f"batch {cells[0]} compiled vs eager"] = cells[-2]
    emit("compile_generate", True, metrics, "(a) transformers generate + Lumina processors, (b) Lumina-style loop; "
         f"{' '.join(s.generate_args)} --compile; goal >= 3x (a) per image; compile time excluded")


# check NAME runs section_NAME(w, s)
SECTION_FUNCS: dict[str, Callable[[Where, Sizes], None]] = {c.name: globals()[f"section_{c.name}"] for c in CHECKS}


# ----------------------------------------------------------------------------------------------------------
# the run: preflight, each check in a child process under its limit and the global budget, the table


class PreflightError(RuntimeError):
    """The machine cannot run the checks (a required package is missing); gpu_check exits 2."""


def _version(dist_name: str, module: str) -> str:
    """``dist_name``'s installed version, or 'MISSING (error)' when ``module`` does not import."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is what the preflight reports
        return f"MISSING ({type(e).__name__}: {e})"
    # the top package's folder: the image's own or the carried one (bench/gpu_prepare.sh)
    top = Path(sys.modules[module.split(".")[0]].__file__).parent
    try:
        return f"{importlib.metadata.version(dist_name)} ({top})"
    except importlib.metadata.PackageNotFoundError:
        return f"imported (no package metadata) ({top})"


def _in_range(version: str, lo: str, hi: str) -> bool:
    v = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    return tuple(int(x) for x in lo.split(".")) <= v <= tuple(int(x) for x in hi.split("."))


def preflight(rehearse: bool) -> list[str]:
    """Lines describing the machine and the stack; raises PreflightError when a required package is missing."""
    lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU {p.name} x {torch.cuda.device_count()}, {p.total_memory / 2**30:.0f} GiB, "
                     f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            lines.append(f"driver {drv[0] if drv else 'unknown'}")
        except (OSError, subprocess.TimeoutExpired):
            lines.append("driver unknown (nvidia-smi did not answer)")
    else:
        lines.append("no CUDA device" + (": CPU rehearsal" if rehearse else ""))
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    missing = []
    for dist_name, module in (("transformers", "transformers"), ("tokenizers", "tokenizers"),
                              ("taming-transformers", "taming.modules.diffusionmodules.model"),
                              ("fairscale", "fairscale")):
        v = _version(dist_name, module)
        lines.append(f"{dist_name} {v}")
        if v.startswith("MISSING"):
            missing.append(dist_name)
    for name, (lo, hi) in SUPPORTED.items():
        v = torch.__version__ if name == "torch" else "" if name in missing else importlib.metadata.version(name)
        if v and not _in_range(v, lo, hi):
            lines.append(f"WARNING: {name} {v} is outside the tested range {lo}-{hi} (README, 'Supported versions')")
    offline = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k) == "1"]
    lines.append("offline: " + (", ".join(offline) if offline else "not set (the checks' children set it)"))
    if missing:
        raise PreflightError(
            "cannot run the checks: " + ", ".join(missing) + " missing. On the GPU machine they travel as wheels: "
            "run `bash bench/gpu_prepare.sh` here, carry .whl, and start with `bash bench/gpu_check.sh` (it installs "
            ".whl/*.whl). Elsewhere: pip install --no-deps -r requirements-nodeps.txt fairscale==0.4.13\n  "
            + "\n  ".join(lines))
    return lines


@dataclass
class Result:
    check: str
    status: str  # ok, FAILED, TIMED OUT, SKIPPED
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    note: str = ""
    tail: str = ""


def read_results(log: Path) -> dict | None:
    """The last GPUCHECK record in ``log`` (None when the check never reported)."""
    rec = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(PREFIX):
            rec = json.loads(line[len(PREFIX):])
    return rec


def render(results: list[Result], preflight_lines: list[str], header: str) -> str:
    out = [f"# gpu_check: {header}", "", *(f"- {x}" for x in preflight_lines), "",
           "| check | result | s | figures | note |", "|---|---|---|---|---|"]
    for r in results:
        figs = ", ".join(f"{k} {v}" for k, v in r.metrics.items()) or "-"
        out.append(f"| {r.check} | {r.status} | {r.seconds:.0f} | {figs} | {r.note} |")
    failed = [r for r in results if r.tail]
    for r in failed:
        out += ["", f"## {r.check}: {r.status}, last lines of its log", "```", r.tail, "```"]
    out += ["", "## raw results", "```json", *(json.dumps(dataclasses.asdict(r) | {"tail": None}) for r in results),
            "```", ""]
    return "\n".join(out)


def table(logs: list[str]) -> str:
    """The table of the GPUCHECK records in ``logs`` (one row per check found)."""
    res = []
    for log in logs:
        rec = read_results(Path(log))
        if rec:
            res.append(Result(rec["section"], "ok" if rec["ok"] else "FAILED", 0.0, rec["metrics"], rec["note"]))
    return render(res, [], "from " + ", ".join(logs))


def _kill_group(p: subprocess.Popen) -> None:
    """Ends the check's process group (the check and the commands it started), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").rstrip().splitlines()[-TAIL_LINES:])


def run_one(c: Check, limit: float, out: Path, work: Path, rehearse: bool) -> Result:
    log = out / f"{c.name}.log"
    cmd = [__file__, c.name, "--work", str(work / c.name)] + (["--rehearse-cpu"] if rehearse else [])
    if c.torchrun:
        n = 2 if rehearse else max(torch.cuda.device_count(), 1)
        port = 29400 + os.getpid() % 500
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
               "--master_port", str(port), *cmd]
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, timed_out = p.returncode, True
    dt = time.monotonic() - t0
    if log.stat().st_size > MAX_LOG_BYTES:  # keep the end: that is where the error is
        with open(log, "rb") as f:
            f.seek(-MAX_LOG_BYTES, os.SEEK_END)
            data = f.read()
        log.write_bytes(b"[... cut: the log's last 4 MB follow]\n" + data)
    rec = read_results(log)
    if timed_out:
        r = Result(c.name, "TIMED OUT", dt, rec["metrics"] if rec else {},
                   f"killed at its limit of {limit:.0f} s" + (f"; it had reported: {rec['note']}" if rec else ""))
    elif rec is None:
        r = Result(c.name, "FAILED", dt, {}, f"exited with code {rc} without reporting")
    else:
        ok = rec["ok"] and rc == 0
        r = Result(c.name, "ok" if ok else "FAILED", dt, rec["metrics"],
                   rec["note"] + ("" if rc == 0 else f" (exit code {rc})"))
    if r.status != "ok":
        r.tail = _tail(log)
    return r


def pack_logs(out: Path, names: list[str]) -> None:
    """At most MAX_FILES files come back from the device: with more checks than that, one checks.log."""
    if len(names) + 1 <= MAX_FILES:
        return
    with open(out / "checks.log", "w") as f:
        for n in names:
            log = out / f"{n}.log"
            if log.exists():
                f.write(f"===== {n} =====\n{log.read_text(errors='replace')}\n")
                log.unlink()


def run(a) -> int:
    rehearse = a.rehearse_cpu
    if not rehearse and not torch.cuda.is_available():
        print("gpu_check: SKIPPED: no CUDA GPU (torch.cuda.is_available() is False with "
              f"{sys.executable}); nothing was run. --rehearse-cpu runs the checks on the CPU.", file=sys.stderr)
        return 77
    try:
        pre = preflight(rehearse)
    except PreflightError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if rehearse:  # every child on the CPU, also on a machine with a GPU (finetune_solver.py would take it)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = a.budget if a.budget is not None else DEFAULT_BUDGET_S["cpu" if rehearse else "gpu"]
    selected = [c for c in CHECKS if c.name in a.only]
    header = (f"{'CPU rehearsal' if rehearse else 'GPU'}, checks {','.join(c.name for c in selected)}, budget "
              f"{budget} s, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"gpu_check: {header}; results in {out}")
    for line in pre:
        print(f"gpu_check: {line}")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    results: list[Result] = []
    t_start = time.monotonic()
    try:
        for c in selected:
            left = budget - (time.monotonic() - t_start)
            if left < 1:
                results.append(Result(c.name, "SKIPPED", 0.0, {}, f"the budget of {budget} s was spent before it"))
                print(f"gpu_check: {c.name} skipped: budget spent", flush=True)
            else:
                limit = min(c.limit_s * (REHEARSAL_LIMIT_FACTOR if rehearse else 1), left)
                print(f"gpu_check: {c.name} (limit {limit:.0f} s): {c.what}", flush=True)
                r = run_one(c, limit, out, work, rehearse)
                results.append(r)
                print(f"gpu_check: {c.name} {r.status} in {r.seconds:.1f} s", flush=True)
                if r.tail:
                    print(f"gpu_check: {c.name}: {r.note}; last lines of {out / (c.name + '.log')}:\n"
                          + "\n".join("    " + x for x in r.tail.splitlines()), file=sys.stderr, flush=True)
            (out / "table.md").write_text(render(results, pre, header))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    text = render(results, pre, header + f", took {time.monotonic() - t_start:.0f} s")
    (out / "table.md").write_text(text)
    pack_logs(out, [c.name for c in selected])
    print("\n".join(x for x in text.splitlines() if x.startswith("|")))
    return 0 if all(r.status == "ok" for r in results) else 1


def run_section(a) -> int:
    """One check in this process: its GPUCHECK line on stdout; an exception is reported as a failed row."""
    if a.rehearse_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the commands it starts stay on the CPU too
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        w = Where(torch.device("cpu"), "gloo", True, Path())
        sizes = REHEARSAL
    elif not torch.cuda.is_available():
        print(f"gpu_check.py {a.section}: no CUDA GPU, nothing to check (--rehearse-cpu runs it on the CPU)",
              file=sys.stderr)
        return 77
    else:
        w = Where(torch.device("cuda", 0), "nccl", False, Path())
        sizes = Sizes()
    os.environ.update({k: v for k, v in child_env().items() if k in ("PYTHONPATH", "HF_HUB_OFFLINE",
                                                                       "TRANSFORMERS_OFFLINE")})
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix=f"gpu_check_{a.section}_"))
    work.mkdir(parents=True, exist_ok=True)
    w = dataclasses.replace(w, work=work)
    try:
        SECTION_FUNCS[a.section](w, sizes)
        return 0
    except Exception as e:  # noqa: BLE001 - report any failure as the check's row, with its cause
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        emit(a.section, False, {}, f"{type(e).__name__}: {msg[0] if msg else ''}"[:300])
        return 1
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("run", "table") + SECTIONS, help="run all checks, one check, or the table")
    p.add_argument("logs", nargs="*", help="table: the logs holding GPUCHECK lines")
    p.add_argument("--rehearse-cpu", action="store_true",
                   help="run on the CPU at tiny sizes (gloo, bf16 on the CPU): the plumbing, not the figures")
    p.add_argument("--only", default=",".join(SECTIONS), help="run: comma-separated checks (default: all, in order)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"run: start no check after this many seconds (default {DEFAULT_BUDGET_S['gpu']} on a GPU, "
                        f"{DEFAULT_BUDGET_S['cpu']} for --rehearse-cpu)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out" / "gpu_check"),
                   help="run: the results folder: table.md and one log per check (default: $OUT when set, "
                        "else bench/out/gpu_check)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, deleted at the end)")
    a = p.parse_args(argv)
    if a.what == "table":
        if not a.logs:
            p.error("table needs at least one log")
        print(table(a.logs))
        return 0
    if a.what == "run":
        a.only = [x for x in a.only.split(",") if x]
        bad = [x for x in a.only if x not in SECTIONS]
        if bad or not a.only:
            p.error(f"--only: unknown check {', '.join(repr(x) for x in bad) or '(none given)'} "
                    f"(checks: {', '.join(SECTIONS)})")
        return run(a)
    a.section = a.what
    return run_section(a)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

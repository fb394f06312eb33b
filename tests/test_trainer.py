"""End-to-end tests of finetune_solver.py on a tiny model and data set: real processes, gloo, CPU.

Runs shared by several tests are module fixtures: a 1-rank run (fsdp), a 2-rank torchrun run (sdp,
activation checkpointing) with the same global batch, and a 1-rank run with dropout (for exact resume).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_helper import REPO, free_port, make_learnable_data, run, torchrun
import finetune_solver
from model.training import checkpointing as ck
from model.make_tiny_model import make_tiny_model

TIMEOUT = 120
METRIC_KEYS = {"step", "epoch", "iter", "lr", "loss", "closs", "z_loss", "grad_norm", "time", "data_time",
               "tokens_per_sec", "tflops", "memory"}


@pytest.fixture(scope="module")
def assets(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_assets")
    return {"model": make_tiny_model(tiny_bundle, root / "model", seed=0),
            "data": make_learnable_data(root / "data", n_items=32)}


def base_flags(assets, out: Path, *extra: str) -> list[str]:
    return ["--init_from", str(assets["model"]), "--data_config", str(assets["data"]), "--output_dir", str(out),
            "--precision", "fp32", "--num_workers", "0", "--log_every", "1", "--lr", "1e-2", "--warmup_epochs", "0.1",
            "--z_loss_weight", "1e-3", "--epochs", "1", *extra]


def solve(assets, out: Path, *extra: str, nproc: int = 1, check: bool = True, timeout: float = TIMEOUT) -> int:
    """One run: torchrun subprocess for nproc > 1; in this process for one rank (saves ~5 s of imports per
    run; main() tears down its process group and log handlers)."""
    flags = base_flags(assets, out, *extra)
    if nproc > 1:
        return run(torchrun(nproc, ["finetune_solver.py", *flags]), timeout=timeout, check=check).returncode
    assert not dist.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): 2 cores are shared
    try:
        code = finetune_solver.main(flags)
    finally:
        torch.set_num_threads(threads)
    assert not dist.is_initialized()
    if check:
        assert code == 0, (out / "common.log").read_text()[-3000:]
    return code


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows}  # a resumed run appends; the last row of a step wins


@pytest.fixture(scope="module")
def run_1rank(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    solve(assets, out, "--batch_size", "2", "--accum_iter", "2", "--save_iteration_interval", "4")
    return out


@pytest.fixture(scope="module")
def run_2rank(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    solve(assets, out, "--batch_size", "1", "--accum_iter", "2", "--save_iteration_interval", "4",
          "--data_parallel", "sdp", "--checkpointing", nproc=2)
    return out


@pytest.fixture(scope="module")
def run_dropout(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("dropout")
    solve(assets, out, *DROPOUT_FLAGS)
    return out


DROPOUT_FLAGS = ("--batch_size", "2", "--accum_iter", "2", "--dropout", "0.1", "--save_iteration_interval", "2",
                 "--checkpointing")


@pytest.mark.slow
def test_loss_decreases_on_a_learnable_data_set(run_1rank):
    m = metrics(run_1rank)
    assert sorted(m) == list(range(1, 9))
    assert METRIC_KEYS <= set(m[1])
    first, last = m[1]["loss"], m[8]["loss"]
    assert last < 0.75 * first, (first, last)
    for r in m.values():
        assert abs(r["loss"] - (r["closs"] + 1e-3 * r["z_loss"])) < 1e-9
        assert r["tokens_per_sec"] > 0 and r["tflops"] > 0 and r["memory"] > 0
    assert m[8]["eta"] == 0 and m[4]["eta"] > 0  # 8 steps in all: none left after the last
    assert " ETA " in (run_1rank / "common.log").read_text()


def test_eta_is_the_median_of_recent_step_times_times_the_steps_left():
    from model.training.metrics import EtaClock, format_console, format_duration
    clock = EtaClock(end_step=10, window=3)
    assert clock.update(1, 100.0) == 900.0  # one step known: it is the estimate
    clock.update(2, 1.0)
    assert clock.update(3, 2.0) == 2.0 * 7  # the median drops the first step's compile/warm-up time
    assert clock.update(4, 1.0) == 1.0 * 6  # window 3: 2.0, 1.0, 1.0
    assert clock.update(12, 1.0) == 0.0
    assert [format_duration(x) for x in (12, 247, 11100, 93600)] == ["12s", "4m07s", "3h05m", "1d02h"]
    row = {"epoch": 0, "iter": 1, "step": 1, "loss": 1.0, "closs": 1.0, "z_loss": 0.0, "lr": 0.1, "grad_norm": 1.0,
           "tokens_per_sec": 1.0, "tflops": 0.0, "time": 1.0, "data_time": 0.0, "memory": 1.0, "eta": 247.0}
    assert format_console(row, 10).endswith("ETA 4m07s")


@pytest.mark.slow
def test_logged_lr_follows_lumina_schedule_at_each_accumulation_boundary(run_1rank):
    """8 steps of 2 micro-batches (16 per epoch), --lr 1e-2, --warmup_epochs 0.1, --min_lr 0: Lumina sets
    the lr of step s at micro-batch 2s+1, epoch (2s+1)/16 (see tests/test_optim.py)."""
    m = metrics(run_1rank)
    for s in range(8):
        e = (2 * s + 1) / 16
        want = 1e-2 * e / 0.1 if e < 0.1 else 1e-2 * 0.5 * (1 + math.cos(math.pi * (e - 0.1) / 0.9))
        assert m[s + 1]["lr"] == pytest.approx(want, rel=1e-9), s


@pytest.mark.slow
def test_checkpoints_logs_and_export_are_laid_out_as_documented(run_1rank):
    names = sorted(p.name for p in run_1rank.iterdir())
    assert {"epoch0-iter4", "epoch0", "metrics.jsonl", "common.log", "rank-0.log"} <= set(names)
    assert not [n for n in names if n.startswith(ck.TMP_PREFIX)]
    for name, it, done in (("epoch0-iter4", 4, False), ("epoch0", 8, True)):
        d = run_1rank / name
        assert {ck.MARKER, ".metadata", "trainer_state.json", "args.json", "config.json"} <= {p.name for p in d.iterdir()}
        assert (d / "rng" / "rank00000.pt").is_file()
        st = ck.read_train_state(d)
        assert (st["epoch"], st["iter"], st["epoch_done"], st["sampler"]["step"]) == (0, it, done, it)
        assert json.loads((d / "args.json").read_text())["batch_size"] == 2
    assert (run_1rank / "epoch0" / "hf" / "model.safetensors").is_file()
    assert not (run_1rank / "epoch0-iter4" / "hf").exists()
    assert "step 8/8" in (run_1rank / "common.log").read_text()


def _same_logits(ckpt: Path, hf_dir: Path) -> None:
    from transformers import ChameleonForConditionalGeneration

    from model.export_hf import load_lm_from_checkpoint

    lm = load_lm_from_checkpoint(ckpt)
    hf = ChameleonForConditionalGeneration.from_pretrained(hf_dir).eval()
    ids = torch.randint(9000, 10700, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[0, 5:12] = torch.arange(100, 107)  # image codes in the input
    ours = lm.logits(ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids, use_cache=False).logits  # transformers masks image-code logits ...
        full = hf.lm_head(hf.model(input_ids=ids, use_cache=False).last_hidden_state)  # ... so compare both
    lo, hi = lm.lm_head._image_range
    assert torch.equal(ours, full)
    assert torch.equal(ours[..., :lo], theirs[..., :lo]) and torch.equal(ours[..., hi:], theirs[..., hi:])
    assert ours.abs().sum() > 0


@pytest.mark.slow
def test_exported_hf_dir_loads_in_transformers_and_gives_the_same_logits(run_1rank, tmp_path):
    from model.export_hf import main as export_main

    _same_logits(run_1rank / "epoch0", run_1rank / "epoch0" / "hf")  # written by the trainer at the epoch end
    assert export_main(["--ckpt", str(run_1rank / "epoch0-iter4"), "--out", str(tmp_path / "hf")]) == 0
    _same_logits(run_1rank / "epoch0-iter4", tmp_path / "hf")  # written by model/export_hf.py


@pytest.mark.slow
def test_two_ranks_and_one_rank_give_the_same_loss_curve(run_1rank, run_2rank):
    one, two = metrics(run_1rank), metrics(run_2rank)
    assert sorted(two) == sorted(one)
    for s in one:
        assert one[s]["tokens"] == two[s]["tokens"]
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4), s
    ranks = {p.name for p in (run_2rank / "epoch0-iter4" / "rng").iterdir()}
    assert ranks == {"rank00000.pt", "rank00001.pt"}


@pytest.mark.slow
def test_packing_gives_the_same_losses_as_padding(assets, run_1rank, tmp_path):
    solve(assets, tmp_path, "--batch_size", "2", "--accum_iter", "2", "--packing", "--max_steps", "4")
    padded, packed = metrics(run_1rank), metrics(tmp_path)
    for s in (1, 2, 3, 4):
        assert packed[s]["tokens"] == padded[s]["tokens"]
        assert packed[s]["loss"] == pytest.approx(padded[s]["loss"], rel=1e-5), s


@pytest.mark.slow
def test_resume_on_a_different_world_size_continues_the_curve(assets, run_2rank, tmp_path):
    # the same global batch and --accum_iter (Lumina's schedule evaluates the lr at the last micro-batch of
    # each accumulation window, so another --accum_iter is another lr curve: tests/test_optim.py)
    solve(assets, tmp_path, "--batch_size", "2", "--accum_iter", "2", "--resume_path",
          str(run_2rank / "epoch0-iter4"))
    two, one = metrics(run_2rank), metrics(tmp_path)
    assert sorted(one) == [5, 6, 7, 8]
    for s in one:
        assert one[s]["loss"] == pytest.approx(two[s]["loss"], rel=1e-5), s


@pytest.mark.slow
def test_resume_gives_identical_losses(assets, run_dropout, tmp_path):
    solve(assets, tmp_path, *DROPOUT_FLAGS, "--max_steps", "3")
    assert ck.latest_checkpoint(tmp_path).name == "epoch0-iter3"  # written at the stop
    solve(assets, tmp_path, *DROPOUT_FLAGS)  # --auto_resume is the default
    full, resumed = metrics(run_dropout), metrics(tmp_path)
    assert sorted(resumed) == sorted(full) == list(range(1, 9))
    for s in full:  # bitwise: same batches, same dropout masks, same optimizer state
        assert resumed[s]["loss"] == full[s]["loss"] and resumed[s]["grad_norm"] == full[s]["grad_norm"], s
    assert "resuming from" in (tmp_path / "common.log").read_text()


KILLER = """
import os, signal, sys
import model.training.checkpointing as ck
import finetune_solver
calls, save = [0], ck.dcp_save
def save_then_die(*a, **k):  # the 2nd checkpoint's shards get written, then SIGKILL before it is complete
    calls[0] += 1
    save(*a, **k)
    if calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
ck.dcp_save = save_then_die
sys.exit(finetune_solver.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_checkpoint(assets, run_dropout, tmp_path):
    res = run([sys.executable, "-c", KILLER, *base_flags(assets, tmp_path, *DROPOUT_FLAGS)], timeout=TIMEOUT,
              check=False)
    assert res.returncode == -9, res.stdout[-3000:]
    assert (tmp_path / f"{ck.TMP_PREFIX}epoch0-iter4").is_dir()  # the interrupted save
    assert ck.latest_checkpoint(tmp_path).name == "epoch0-iter2"
    solve(assets, tmp_path, *DROPOUT_FLAGS)
    log = (tmp_path / "common.log").read_text()
    assert f"resuming from {tmp_path / 'epoch0-iter2'}" in log
    assert not any(p.name.startswith(ck.TMP_PREFIX) for p in tmp_path.iterdir())
    full, resumed = metrics(run_dropout), metrics(tmp_path)
    for s in range(3, 9):
        assert resumed[s]["loss"] == full[s]["loss"], s


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(assets, tmp_path):
    # lr 1e30 from the first update on: step 1 is finite, its update blows the weights up, step 2 is not
    code = solve(assets, tmp_path, "--batch_size", "2", "--accum_iter", "2", "--lr", "1e30", "--min_lr", "1e30",
                 "--warmup_epochs", "0", "--save_iteration_interval", "1", check=False)
    log = (tmp_path / "common.log").read_text()
    assert code == 1, log[-3000:]
    assert "step 2 (epoch 0, iter 2): non-finite" in log
    assert f"left intact: {tmp_path / 'epoch0-iter1'}" in log
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["epoch0-iter1"]
    assert ck.read_train_state(tmp_path / "epoch0-iter1")["global_step"] == 1
    assert sorted(metrics(tmp_path)) == [1]


def _script_argv(script: str, env: dict) -> list[str]:
    res = run(["bash", f"exps/{script}", "--max_steps", "0"], timeout=30, env={"DRY_RUN": "1", **env})
    return shlex.split(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["7B.sh", "34B.sh"])
def test_exps_scripts_pass_lumina_hyperparameters_that_the_solver_accepts(script, assets, tmp_path):
    env = {"INIT_FROM": str(assets["model"]), "DATA_CONFIG": str(assets["data"]), "OUTPUT_DIR": str(tmp_path)}
    argv = _script_argv(script, env)
    assert argv[:3] == ["python", "-u", "finetune_solver.py"]
    a = finetune_solver.parse_args(argv[3:])
    size = script.removesuffix(".sh")
    assert (a.model_size, a.lr, a.min_lr, a.wd, a.dropout, a.z_loss_weight, a.batch_size, a.accum_iter, a.epochs,
            a.warmup_epochs, a.max_seq_len, a.clip_grad) == (size, 2e-5, 2e-5, 0.1, 0.05, 1e-5, 8, 1, 2, 0.01, 4096, 4)
    assert (a.mask_image_logits, a.checkpointing, a.precision, a.grad_precision, a.data_parallel,
            a.model_parallel_size, a.max_steps) == (False, True, "bf16", "fp32", "fsdp", 1, 0)
    assert (a.init_from, a.data_config, a.output_dir) == (env["INIT_FROM"], env["DATA_CONFIG"], env["OUTPUT_DIR"])
    assert a.compile is False
    tr = _script_argv(script, {**env, "LAUNCHER": "torchrun", "NPROC_PER_NODE": "4"})
    assert tr[0] == "torchrun" and tr[tr.index("--nproc_per_node") + 1] == "4" and "finetune_solver.py" in tr
    assert finetune_solver.parse_args(_script_argv(script, {**env, "COMPILE": "1"})[3:]).compile is True
    assert finetune_solver.parse_args(_script_argv(script, {**env, "COMPILE": "0"})[3:]).compile is False


@pytest.mark.slow
def test_exps_7B_trains_under_a_simulated_two_task_srun(assets, tmp_path):
    """Both tasks run the shipped script, as `srun -n2 bash exps/7B.sh` would; CPU overrides go through "$@"."""
    import subprocess

    port = str(free_port())
    env = {"INIT_FROM": str(assets["model"]), "DATA_CONFIG": str(assets["data"]), "OUTPUT_DIR": str(tmp_path),
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port, "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    cmd = ["bash", "exps/7B.sh", "--precision", "fp32", "--num_workers", "0", "--batch_size", "2", "--max_steps", "2",
           "--no_export_hf", "--max_seq_len", "64", "--log_every", "1"]
    import os

    procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert sorted(metrics(tmp_path)) == [1, 2]
    st = ck.read_train_state(tmp_path / "epoch0-iter2")
    assert (st["world_size"], st["global_batch_size"]) == (2, 4)
    assert "launcher slurm" in (tmp_path / "common.log").read_text()


def test_flags_have_help_pairs_and_clear_errors(assets, capsys):
    text = finetune_solver.build_parser().format_help()
    for f in ("--auto_resume", "--no_auto_resume", "--mask_image_logits", "--unmask_image_logits",
              "--length_clustering", "--disable_length_clustering", "--checkpointing", "--no_checkpointing",
              "--pin_mem", "--no_pin_mem", "--cache_ann_on_disk", "--max_steps", "--log_every", "--packing"):
        assert f in text, f
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", str(assets["data"]), "--model_parallel_size", "2"])
    assert "--model_parallel_size 2: tensor parallelism is not implemented" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", str(assets["data"]), "--min_lr", "1", "--lr", "0.1"])
    assert "--min_lr must be in [0, --lr]" in capsys.readouterr().err
    a = finetune_solver.parse_args(["--data_config", str(assets["data"]), "--no_auto_resume", "--unmask_image_logits",
                                    "--disable_length_clustering", "--no_pin_mem"])
    assert (a.auto_resume, a.mask_image_logits, a.length_clustering, a.pin_mem) == (False, False, False, False)


# LoRA on two projections, a --trainable subset beside it, activation checkpointing and packing: every path
# a compiled layer has to carry. No dropout: the first step is compared with eager (Inductor draws its own
# random numbers, so masks would differ from eager's, though a compiled run resumes with its own exactly).
COMPILE_TIMEOUT = 600  # compiling a layer's forward and backward takes 1-2 minutes on 2 busy cores
COMPILE_FLAGS = ("--batch_size", "2", "--accum_iter", "1", "--save_iteration_interval", "2", "--checkpointing",
                 "--packing", "--lora_rank", "4", "--lora_targets", "q_proj,v_proj", "--trainable", "norms")


@pytest.mark.slow
def test_compiled_layers_match_eager_first_step_and_resume_bitwise_on_two_ranks(assets, tmp_path):
    whole, resumed, eager = tmp_path / "whole", tmp_path / "resumed", tmp_path / "eager"
    solve(assets, whole, *COMPILE_FLAGS, "--compile", "--max_steps", "4", nproc=2,
          timeout=COMPILE_TIMEOUT)
    assert "compiled layers on" in (whole / "common.log").read_text()
    # a run stopped at step 2 has written exactly whole/epoch0-iter2 (same steps, same checkpoint)
    solve(assets, resumed, *COMPILE_FLAGS, "--compile", "--max_steps", "4", "--resume_path",
          str(whole / "epoch0-iter2"), nproc=2, timeout=COMPILE_TIMEOUT)
    solve(assets, eager, *COMPILE_FLAGS, "--max_steps", "1", nproc=2)
    w, r, e = metrics(whole), metrics(resumed), metrics(eager)
    assert sorted(r) == [3, 4]
    for s in r:  # bitwise: same kernels (one dynamic-shape graph), same batches, same optimizer state
        assert r[s]["loss"] == w[s]["loss"] and r[s]["grad_norm"] == w[s]["grad_norm"], s
    assert w[1]["loss"] == pytest.approx(e[1]["loss"], rel=1e-6)
    assert w[1]["grad_norm"] == pytest.approx(e[1]["grad_norm"], rel=1e-4)

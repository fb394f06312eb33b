"""Reliability: finetune_solver.py under the failures of real clusters (tiny model, CPU, gloo).

- SIGKILL during a step (in a forward pass between micro-batches; inside optimizer.step), then a plain
  re-run: auto-resume gives the losses of an uninterrupted run, bit for bit.
- The newest checkpoint damaged after it was written (a DCP shard file truncated or deleted, an RNG file
  truncated): resume falls back to the previous checkpoint with a warning, and the losses are still those
  of an uninterrupted run; when no checkpoint is usable the run stops with a clear error.
- NaN injected into the loss at step 3: the run stops naming the step, before the update, and the last
  good checkpoint is intact (same weights as an uninterrupted run's at that step).
- A dataset file that vanishes mid-run (Lumina per-item pickles; a token shard between epochs, read by a
  DataLoader worker): a clear error naming the file, no hang, no other item in its place.
- A rank SIGKILLed in a 2-rank run: the other exits with an error instead of waiting forever.

Covered elsewhere: SIGKILL during a checkpoint save (tests/test_trainer.py::test_sigkill_during_a_
checkpoint_save_resumes_from_the_previous_checkpoint), a non-finite loss from diverging weights
(test_trainer.py::test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint), a dead
peer failing a collective within the timeout (tests/test_launch_env.py::test_a_dead_rank_makes_the_other_
fail_instead_of_hanging). The figures are in tests/README.md.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

import finetune_solver
from dist_helper import REPO, free_port, make_learnable_data, run
from model.training import checkpointing as ck
from model.make_tiny_model import make_tiny_model

TIMEOUT = 120
# 32 items, global batch 4: 8 steps per epoch; a checkpoint every 2 steps; dropout makes exact resume
# depend on the RNG state too
FLAGS = ("--batch_size", "2", "--accum_iter", "2", "--dropout", "0.1", "--save_iteration_interval", "2",
         "--no_export_hf", "--ckpt_max_keep", "3")


@pytest.fixture(scope="module")
def assets(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_training")
    return {"model": make_tiny_model(tiny_bundle, root / "model", seed=0),
            "data": make_learnable_data(root / "data", n_items=32)}


def flags(assets, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--init_from", str(assets["model"]), "--data_config", str(data or assets["data"]), "--output_dir",
            str(out), "--precision", "fp32", "--num_workers", "0", "--log_every", "1", "--lr", "1e-2",
            "--warmup_epochs", "0.1", "--z_loss_weight", "1e-3", "--epochs", "1", *extra]


def solve(assets, out: Path, *extra: str, data: Path | None = None) -> int:
    """One rank, in this process (no interpreter start-up); main() tears down its process group."""
    assert not dist.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return finetune_solver.main(flags(assets, out, *extra, data=data))
    finally:
        torch.set_num_threads(threads)
        assert not dist.is_initialized()


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows}  # a resumed run appends; the last row of a step wins


def log(out: Path) -> str:
    return (out / "common.log").read_text()


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert solve(assets, out, *FLAGS) == 0, log(out)[-3000:]
    assert sorted(metrics(out)) == list(range(1, 9))
    return out


def assert_same_losses(got: dict, want: dict, steps) -> None:
    for s in steps:  # bitwise: same batches, same dropout masks, same optimizer state
        assert (got[s]["loss"], got[s]["grad_norm"]) == (want[s]["loss"], want[s]["grad_norm"]), s


# ------------------------------------------------------------------------------------- SIGKILL in a step

KILLER = """
import os, signal, sys
import torch
import finetune_solver
where, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def die(*_a, **_k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if where == "forward":  # the n-th forward pass: gradients of the step's earlier micro-batches are held
    from model.chameleon_lm import ChameleonLM
    orig = ChameleonLM.forward
    def forward(self, *a, **k):
        die()
        return orig(self, *a, **k)
    ChameleonLM.forward = forward
else:  # inside the n-th optimizer.step, before the update
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(die)
sys.exit(finetune_solver.main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where,n,resume_from,done", [("forward", 10, "epoch0-iter4", 4),
                                                      ("optimizer_step", 7, "epoch0-iter6", 6)],
                         ids=["forward of step 5's 2nd micro-batch", "optimizer.step of step 7"])
def test_sigkill_during_a_step_then_auto_resume_gives_identical_losses(assets, uninterrupted, tmp_path,
                                                                       where, n, resume_from, done):
    res = run([sys.executable, "-c", KILLER, where, str(n), *flags(assets, tmp_path, *FLAGS)], timeout=TIMEOUT,
              check=False)
    assert res.returncode == -9, res.stdout[-3000:]
    assert ck.latest_checkpoint(tmp_path).name == resume_from
    assert sorted(metrics(tmp_path)) == list(range(1, done + 1))  # the killed step logged nothing
    assert solve(assets, tmp_path, *FLAGS) == 0, log(tmp_path)[-3000:]
    assert f"resuming from {tmp_path / resume_from}" in log(tmp_path)
    assert sorted(metrics(tmp_path)) == list(range(1, 9))
    assert_same_losses(metrics(tmp_path), metrics(uninterrupted), range(1, 9))


# ---------------------------------------------------------------------------------- damaged checkpoints


def _truncate_half(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


DAMAGE = {
    "a DCP shard file truncated": lambda d: _truncate_half(d / "__0_0.distcp"),
    "a DCP shard file deleted": lambda d: (d / "__0_0.distcp").unlink(),
    "an RNG state file truncated": lambda d: _truncate_half(d / "rng" / "rank00000.pt"),
    "the DCP metadata truncated": lambda d: _truncate_half(d / ".metadata"),
}


@pytest.fixture(scope="module")
def four_steps(assets, tmp_path_factory) -> Path:
    """A run stopped at step 4: checkpoints epoch0-iter2 and epoch0-iter4."""
    out = tmp_path_factory.mktemp("four_steps")
    assert solve(assets, out, *FLAGS, "--max_steps", "4") == 0, log(out)[-3000:]
    assert [p.name for p in ck.complete_checkpoints(out)] == ["epoch0-iter2", "epoch0-iter4"]
    return out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one_with_a_warning(four_steps, tmp_path, caplog, damage):
    out = tmp_path / "out"
    shutil.copytree(four_steps, out)
    DAMAGE[damage](out / "epoch0-iter4")
    with pytest.raises(ck.CheckpointError):
        ck.verify_checkpoint(out / "epoch0-iter4")
    ck.verify_checkpoint(out / "epoch0-iter2")
    with caplog.at_level("WARNING"):
        assert ck.latest_usable_checkpoint(out) == out / "epoch0-iter2"
    assert f"checkpoint {out / 'epoch0-iter4'} is damaged, falling back" in caplog.text
    DAMAGE[damage](out / "epoch0-iter2")
    with pytest.raises(ck.CheckpointError, match="none of the 2 complete checkpoints is usable"):
        ck.latest_usable_checkpoint(out)


@pytest.mark.slow
def test_truncated_newest_checkpoint_resume_falls_back_and_gives_identical_losses(assets, four_steps, uninterrupted,
                                                                                  tmp_path):
    out = tmp_path / "out"
    shutil.copytree(four_steps, out)
    _truncate_half(out / "epoch0-iter4" / "__0_0.distcp")
    assert solve(assets, out, *FLAGS) == 0, log(out)[-3000:]
    text = log(out)
    assert f"checkpoint {out / 'epoch0-iter4'} is damaged, falling back" in text and "truncated" in text
    assert f"resuming from {out / 'epoch0-iter2'}" in text
    assert_same_losses(metrics(out), metrics(uninterrupted), range(3, 9))
    ck.verify_checkpoint(out / "epoch0-iter4")  # re-saved whole by the resumed run


def test_a_run_whose_checkpoints_are_all_damaged_stops_with_a_clear_error(assets, four_steps, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(four_steps, out)
    for name in ("epoch0-iter2", "epoch0-iter4"):
        _truncate_half(out / name / "__0_0.distcp")
    assert solve(assets, out, *FLAGS) == 1
    assert "none of the 2 complete checkpoints is usable" in log(out) and "--no_auto_resume" in log(out)


# ------------------------------------------------------------------------------------------------ NaN


def test_nan_in_the_loss_stops_naming_the_step_and_leaves_the_last_checkpoint_intact(assets, four_steps,
                                                                                     tmp_path, monkeypatch):
    from model.chameleon_lm import ChameleonLM
    from model.export_hf import load_lm_from_checkpoint

    orig, calls = ChameleonLM.forward, [0]

    def forward(self, *a, **k):  # the first micro-batch of step 3 gives NaN
        out = orig(self, *a, **k)
        calls[0] += 1
        return out._replace(loss=out.loss * math.nan, ce_sum=out.ce_sum * math.nan) if calls[0] == 5 else out

    monkeypatch.setattr(ChameleonLM, "forward", forward)
    assert solve(assets, tmp_path, *FLAGS) == 1
    text = log(tmp_path)
    assert "step 3 (epoch 0, iter 3): non-finite loss (loss nan" in text, text[-3000:]
    assert f"stopping before the update. Newest checkpoint, left intact: {tmp_path / 'epoch0-iter2'}" in text
    assert sorted(metrics(tmp_path)) == [1, 2]
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["epoch0-iter2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(ck.TMP_PREFIX)]
    ck.verify_checkpoint(tmp_path / "epoch0-iter2")
    got = load_lm_from_checkpoint(tmp_path / "epoch0-iter2").state_dict()
    want = load_lm_from_checkpoint(four_steps / "epoch0-iter2").state_dict()  # same first 2 steps
    assert all(torch.equal(got[k], want[k]) for k in want)


# -------------------------------------------------------------------------------- vanishing data files


def _lumina_pickle_data(out: Path, src_yaml: Path) -> Path:
    """The learnable data set as Lumina's own records: one .pkl per item, a record.json naming them."""
    from data.dataset import RecordDataset
    from data.data_config import load_data_config

    ds = RecordDataset(load_data_config(src_yaml), max_seq_len=10_000)
    (out / "pkl").mkdir(parents=True)
    recs = []
    for i in range(len(ds)):
        it = ds[i]
        path = out / "pkl" / f"{i}.pkl"
        path.write_bytes(pickle.dumps({"token": it["input_ids"].tolist(), "label": it["labels"].tolist()}))
        recs.append({"file": str(path), "len": len(it["input_ids"]), "id": i})
    (out / "record.json").write_text(json.dumps(recs))
    (out / "data.yaml").write_text("META:\n  - path: record.json\n")
    return out / "data.yaml"


def test_lumina_pickles_that_vanish_mid_run_give_a_clear_error_naming_the_file(assets, tmp_path):
    data = _lumina_pickle_data(tmp_path / "data", assets["data"])
    steps = [0]

    def vanish(*_a, **_k):  # after the 2nd update, the items' files are deleted (a cleaned-up scratch disk)
        steps[0] += 1
        if steps[0] == 2:
            for p in (tmp_path / "data" / "pkl").iterdir():
                p.unlink()

    handle = register_optimizer_step_post_hook(vanish)
    t0 = time.monotonic()
    try:
        code = solve(assets, tmp_path / "out", *FLAGS, data=data)
    finally:
        handle.remove()
    text = log(tmp_path / "out")
    assert code == 1, text[-3000:]
    assert time.monotonic() - t0 < 60
    assert "step 3 (epoch 0, iter 3): cannot read the training data" in text, text[-3000:]
    assert f"pickle file {tmp_path / 'data' / 'pkl'}" in text and "does not exist" in text
    assert sorted(metrics(tmp_path / "out")) == [1, 2]


def test_a_token_shard_that_vanishes_between_epochs_gives_a_clear_error_in_the_loader_worker(assets, tmp_path):
    """Epoch 0 reads the shard; it is deleted; epoch 1's DataLoader worker opens it anew and must fail."""
    data = tmp_path / "data"
    shutil.copytree(Path(assets["data"]).parent, data)
    shard = data / "0-of-1-tokens.bin"
    steps = [0]

    def vanish(*_a, **_k):
        steps[0] += 1
        if steps[0] == 8:  # the last step of epoch 0
            shard.unlink()

    handle = register_optimizer_step_post_hook(vanish)
    try:
        code = solve(assets, tmp_path / "out", *FLAGS, "--epochs", "2", "--num_workers", "1",
                     data=data / "data.yaml")
    finally:
        handle.remove()
    text = log(tmp_path / "out")
    assert code == 1, text[-3000:]
    assert "step 9 (epoch 1, iter 1): cannot read the training data" in text, text[-3000:]
    assert str(shard) in text and "No such file" in text
    assert sorted(metrics(tmp_path / "out")) == list(range(1, 9))


# ----------------------------------------------------------------------------------- a rank that dies


@pytest.mark.slow
def test_a_rank_killed_in_a_two_rank_run_makes_the_other_exit_with_an_error(assets, tmp_path):
    port, out = str(free_port()), tmp_path / "out"
    argv = flags(assets, out, "--batch_size", "1", "--accum_iter", "2", "--no_export_hf", "--save_iteration_interval",
                 "0", "--dist_timeout", "30")
    procs = []
    for r in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-c", KILLER, "optimizer_step", "3" if r == 1 else "1000000", *argv]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        out1 = procs[1].communicate(timeout=TIMEOUT)[0]
        t_dead = time.monotonic()
        out0 = procs[0].communicate(timeout=TIMEOUT)[0]  # a hang fails here, after TIMEOUT
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    waited = time.monotonic() - t_dead
    assert procs[1].returncode == -9, out1[-3000:]
    assert procs[0].returncode == 1, out0[-3000:]
    assert waited < 45, f"the surviving rank took {waited:.0f}s to give up"
    assert sorted(metrics(out)) == [1, 2, 3]  # rank 1 died in step 3's optimizer.step, after its collectives
    # gloo notices the closed connection at once ("Connection reset/closed by peer"); --dist_timeout is the
    # bound for a peer that hangs instead of dying

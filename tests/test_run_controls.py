"""--skip_iterations (Megatron's skipped ranges) and --deterministic, on the tiny model (model/training/run_controls.py).

Runs reuse test_trainer's assets and its uninterrupted dropout run (8 steps, a checkpoint every 2 steps)."""

from __future__ import annotations

import os

import pytest
import torch

import finetune_solver
from model.export_hf import load_lm_from_checkpoint
from model.training.run_controls import SkipRanges
from test_trainer import DROPOUT_FLAGS, assets, metrics, run_dropout, solve  # noqa: F401 - fixtures

SKIP = ("--skip_iterations", "3-4")


def test_skip_ranges_parse_inclusive_ranges_and_single_steps_and_refuse_bad_ones(assets, capsys):  # noqa: F811
    r = SkipRanges.parse(["300-400", "7", "100-110"])
    assert r.ranges == [(7, 7), (100, 110), (300, 400)] and str(r) == "7 100-110 300-400"
    assert 100 in r and 110 in r and 7 in r and 111 not in r and 6 not in r and not SkipRanges.parse(None)
    for bad, msg in (("0-3", "1 <= START <= END"), ("5-3", "1 <= START <= END"), ("a-b", "expected START-END"),
                     ("1-", "expected START-END")):
        with pytest.raises(ValueError, match=msg):
            SkipRanges.parse([bad])
    with pytest.raises(ValueError, match="ranges 1-5 and 4-6 overlap"):
        SkipRanges.parse(["4-6", "1-5"])
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", str(assets["data"]), "--skip_iterations", "10-2"])
    assert "--skip_iterations '10-2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", str(assets["data"]), "--deterministic", "--precision", "tf32"])
    assert "--deterministic turns TF32 off" in capsys.readouterr().err
    a = finetune_solver.parse_args(["--data_config", str(assets["data"]), "--skip_iterations", "1-2", "9"])
    assert a.skip_iterations == ["1-2", "9"]
    text = finetune_solver.build_parser().format_help()
    for f in ("--skip_iterations", "--deterministic", "--no_deterministic", "--tensorboard", "--no_tensorboard",
              "--wandb", "--no_wandb", "--wandb_project", "--wandb_run_name", "--wandb_mode", "--type_loss_window",
              "--val_data_config", "--eval_every", "--eval_items"):
        assert f in text, f
    for bad, msg in ((["--eval_every", "3"], "need --val_data_config"), (["--type_loss_window", "0"], ">= 1"),
                     (["--val_data_config", "/nonexistent.yaml"], "no such file")):
        with pytest.raises(SystemExit):
            finetune_solver.parse_args(["--data_config", str(assets["data"]), *bad])
        assert msg in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_skip(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("skip")
    solve(assets, out, *DROPOUT_FLAGS, *SKIP, "--ckpt_max_keep", "0")
    return out


@pytest.mark.slow
def test_skipped_steps_consume_their_batches_without_training_and_leave_the_data_order_unchanged(
        run_skip, run_dropout, assets, tmp_path):  # noqa: F811
    full, skipped = metrics(run_dropout), metrics(run_skip)
    assert sorted(skipped) == [1, 2, 5, 6, 7, 8]  # no row for a skipped step
    for s in skipped:  # same global batch at every later step (same labelled tokens, same type), same lr
        assert (skipped[s]["tokens"], skipped[s]["type"], skipped[s]["lr"]) == (full[s]["tokens"], full[s]["type"],
                                                                                 full[s]["lr"]), s
    for s in (1, 2):
        assert skipped[s]["loss"] == full[s]["loss"]
    assert skipped[5]["loss"] != full[5]["loss"]  # steps 3-4 did not train
    # no update in steps 3-4: the weights after step 4 are those after step 2 of the unskipped run
    solve(assets, tmp_path, *DROPOUT_FLAGS, "--max_steps", "2")
    after_skip = load_lm_from_checkpoint(run_skip / "epoch0-iter4").state_dict()
    before = load_lm_from_checkpoint(tmp_path / "epoch0-iter2").state_dict()
    assert after_skip.keys() == before.keys()
    assert all(torch.equal(after_skip[k], before[k]) for k in before)
    log = (run_skip / "common.log").read_text()
    assert "step 3 (epoch 0, iter 3): skipped (--skip_iterations 3-4)" in log
    assert "step 4 (epoch 0, iter 4): skipped" in log


@pytest.mark.slow
def test_resume_inside_and_after_a_skipped_range_is_bitwise(assets, run_skip, tmp_path):  # noqa: F811
    solve(assets, tmp_path, *DROPOUT_FLAGS, *SKIP, "--max_steps", "3")  # stops inside the range
    solve(assets, tmp_path, *DROPOUT_FLAGS, *SKIP, "--max_steps", "5")  # resumes at 4, stops after it
    solve(assets, tmp_path, *DROPOUT_FLAGS, *SKIP)
    log = (tmp_path / "common.log").read_text()
    assert f"resuming from {tmp_path / 'epoch0-iter3'}" in log and f"resuming from {tmp_path / 'epoch0-iter5'}" in log
    once, resumed = metrics(run_skip), metrics(tmp_path)
    assert sorted(resumed) == sorted(once)
    for s in once:
        assert resumed[s]["loss"] == once[s]["loss"] and resumed[s]["grad_norm"] == once[s]["grad_norm"], s


@pytest.mark.slow
def test_deterministic_runs_with_two_loader_workers_give_bitwise_identical_losses_also_across_a_resume(
        assets, tmp_path):  # noqa: F811
    flags = (*DROPOUT_FLAGS, "--deterministic", "--num_workers", "2", "--no_export_hf")
    solve(assets, tmp_path / "a", *flags, "--max_steps", "4")
    assert not torch.are_deterministic_algorithms_enabled()  # put back when the run ends
    solve(assets, tmp_path / "b", *flags, "--max_steps", "2")
    solve(assets, tmp_path / "b", *flags, "--max_steps", "4")  # resumes from epoch0-iter2
    assert "resuming from" in (tmp_path / "b" / "common.log").read_text()
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert (a[s]["loss"], a[s]["grad_norm"]) == (b[s]["loss"], b[s]["grad_norm"]), s
    assert '"deterministic": true' in (tmp_path / "a" / "common.log").read_text()


def test_deterministic_flag_is_in_force_inside_the_run_and_sets_cublas_before_cuda_is_probed(
        assets, tmp_path, monkeypatch):  # noqa: F811
    """What --deterministic does, observed inside a training step (CPU runs are reproducible without it, so
    equal losses alone cannot show it): deterministic algorithms on, cuDNN deterministic without autotuning,
    TF32 off, CUBLAS_WORKSPACE_CONFIG set before the run first asks whether CUDA is there (cuBLAS reads it
    when CUDA starts), and every attention call dispatched to SDPA's math kernel (on a CPU, PyTorch would
    pick its flash kernel for the same tensors)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen: dict = {"cuda_probe_env": [], "sdpa": [], "in_step": []}
    real_available, real_sdpa = torch.cuda.is_available, torch.nn.functional.scaled_dot_product_attention

    def probe_cuda() -> bool:
        seen["cuda_probe_env"].append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return real_available()

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        args = (query.detach(), key.detach(), value.detach(), None if attn_mask is None else attn_mask.detach())
        seen["sdpa"].append((torch._fused_sdp_choice(*args, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa),
                             args, dropout_p, is_causal, scale, enable_gqa))
        return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)

    def in_step(*_):
        b = torch.backends
        seen["in_step"].append((torch.are_deterministic_algorithms_enabled(), b.cudnn.deterministic,
                                b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32,
                                b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(),
                                b.cuda.cudnn_sdp_enabled(), b.cuda.math_sdp_enabled(),
                                os.environ.get("CUBLAS_WORKSPACE_CONFIG")))

    monkeypatch.setattr(torch.cuda, "is_available", probe_cuda)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    handle = register_optimizer_step_pre_hook(in_step)
    try:
        solve(assets, tmp_path, "--batch_size", "2", "--accum_iter", "1", "--deterministic", "--max_steps", "2",
              "--no_export_hf", "--save_iteration_interval", "100")
    finally:
        handle.remove()
    assert seen["in_step"] == [(True, True, False, False, False, False, False, False, True, ":4096:8")] * 2
    assert seen["cuda_probe_env"] and set(seen["cuda_probe_env"]) == {":4096:8"}, seen["cuda_probe_env"]
    math = int(torch.nn.attention.SDPBackend.MATH)
    assert seen["sdpa"] and {c[0] for c in seen["sdpa"]} == {math}
    # the flag is undone when the run ends, and then the same attention calls would not take the math kernel
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    _, args, p, causal, scale, gqa = seen["sdpa"][0]
    assert torch._fused_sdp_choice(*args, p, causal, scale=scale, enable_gqa=gqa) != math

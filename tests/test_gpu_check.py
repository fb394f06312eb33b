"""bench/gpu_check.sh, bench/gpu_check.py and bench/gpu_prepare.sh without a GPU: the arguments, the preflight's
exits, the run's bookkeeping (budget, time limits, failures with their last lines, only the selected rows), the
sizes against the benchmarks' own rules, and (slow) the CPU rehearsal of every check end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_helper import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

SCRIPT = ["bash", "bench/gpu_check.sh"]


def sh(*args: str, script=SCRIPT, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **env})


def test_help_lists_every_check_in_the_order_they_run():
    res = sh("--help")
    assert res.returncode == 0
    assert [s for s in gpu_check.SECTIONS if s in res.stdout] == list(gpu_check.SECTIONS)
    assert "--rehearse-cpu" in res.stdout and "--budget" in res.stdout
    # fast, fundamental checks first: nccl and pinned before the long ones
    assert gpu_check.SECTIONS[:3] == ("nccl", "pinned", "train")


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--only", "train,warp"], "unknown check 'warp'"),
    (["--out"], "--out needs a directory"),
    (["--budget", "soon"], "--budget needs a number of seconds"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    res = sh(*args)
    assert res.returncode == 2 and message in res.stderr


def test_an_interpreter_without_torch_exits_2_and_says_so_not_no_gpu(tmp_path):
    fake = tmp_path / "python_without_torch"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages, so no torch
    fake.chmod(0o755)
    res = sh("--out", str(tmp_path / "o"), "--wheels", str(tmp_path / "no_wheels"), PYTHON=str(fake))
    assert res.returncode == 2
    assert "cannot import torch" in res.stderr and "No module named 'torch'" in res.stderr
    assert "no CUDA GPU" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_skips_with_exit_77_and_says_why(tmp_path):
    res = sh("--out", str(tmp_path / "o"), "--wheels", str(tmp_path / "no_wheels"))
    assert res.returncode == 77
    assert "SKIPPED: no CUDA GPU" in res.stderr
    assert not (tmp_path / "o").exists()  # nothing was run
    assert gpu_check.main(["train"]) == 77
    assert gpu_check.main(["run", "--out", str(tmp_path / "o")]) == 77


def test_children_get_the_repo_on_their_path_and_offline_mode(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("RANK", "3")  # a launcher's variables would make finetune_solver.py rendezvous on a port
    env = gpu_check.child_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO)]
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1" and "RANK" not in env


def test_the_script_knows_every_check_of_the_python_side():
    res = sh("--only", ",".join(gpu_check.SECTIONS) + ",warp")
    assert res.returncode == 2 and f"unknown check 'warp' ({', '.join(gpu_check.SECTIONS)})" in res.stderr


def test_a_missing_package_fails_the_preflight_with_how_to_carry_it(monkeypatch):
    real = gpu_check._version
    monkeypatch.setattr(gpu_check, "_version",
                        lambda d, m: "MISSING (ModuleNotFoundError: No module named 'fairscale')" if d == "fairscale"
                        else real(d, m))
    with pytest.raises(gpu_check.PreflightError, match="fairscale missing.*gpu_prepare.sh"):
        gpu_check.preflight(rehearse=True)


def test_preflight_names_the_versions_and_warns_outside_the_tested_range(monkeypatch):
    lines = gpu_check.preflight(rehearse=True)
    text = "\n".join(lines)
    for name in ("torch", "transformers", "tokenizers", "taming-transformers", "fairscale"):
        assert f"\n{name} " in "\n" + text
    monkeypatch.setitem(gpu_check.SUPPORTED, "transformers", ("4.0", "4.1"))
    assert any(x.startswith("WARNING: transformers") for x in gpu_check.preflight(rehearse=True))


def test_budget_spent_skips_checks_and_the_table_lists_only_the_selected_ones(tmp_path, capsys):
    rc = gpu_check.main(["run", "--rehearse-cpu", "--only", "pinned,encode", "--budget", "0",
                         "--out", str(tmp_path)])
    assert rc == 1
    table = (tmp_path / "table.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| check")]
    assert [r.split("|")[1].strip() for r in rows] == ["pinned", "encode"]  # unselected checks: no row at all
    assert all("| SKIPPED |" in r and "budget of 0.0 s was spent" in r for r in rows)


def test_a_check_that_dies_is_failed_with_the_last_lines_of_its_log(tmp_path):
    # an unknown section: the child exits 2 from argparse without reporting
    r = gpu_check.run_one(gpu_check.Check("nosuchcheck", 60, "x"), 60, tmp_path, tmp_path / "work", True)
    assert r.status == "FAILED" and "exited with code 2 without reporting" in r.note
    assert "invalid choice: 'nosuchcheck'" in r.tail
    assert (tmp_path / "nosuchcheck.log").is_file()
    assert "invalid choice" in gpu_check.render([r], ["pre"], "h")


def test_a_check_past_its_limit_is_killed_and_reported_as_timed_out(tmp_path):
    r = gpu_check.run_one(gpu_check.Check("train", 1, "x"), 0.5, tmp_path, tmp_path / "work", True)
    assert r.status == "TIMED OUT" and "killed at its limit of 0 s" in r.note and r.seconds < 15


def test_a_section_that_raises_reports_a_failed_row_with_the_cause(monkeypatch, capsys, tmp_path):
    def boom(w, s):
        raise ValueError("the planner disagrees\nsecond line")

    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "pinned", boom)
    assert gpu_check.main(["pinned", "--rehearse-cpu", "--work", str(tmp_path)]) == 1
    out = capsys.readouterr()
    rec = json.loads(next(x for x in out.out.splitlines() if x.startswith(gpu_check.PREFIX))[len(gpu_check.PREFIX):])
    assert rec == {"section": "pinned", "ok": False, "metrics": {}, "note": "ValueError: the planner disagrees"}
    assert "Traceback" in out.err


def test_more_logs_than_come_back_are_packed_into_one(tmp_path):
    names = [f"c{k}" for k in range(gpu_check.MAX_FILES)]
    for n in names:
        (tmp_path / f"{n}.log").write_text(f"log of {n}\n")
    gpu_check.pack_logs(tmp_path, names)
    assert [p.name for p in tmp_path.iterdir()] == ["checks.log"]
    assert "===== c7 =====\nlog of c7" in (tmp_path / "checks.log").read_text()
    (tmp_path / "a.log").write_text("x")
    gpu_check.pack_logs(tmp_path, ["a"])  # few checks: one log each
    assert (tmp_path / "a.log").exists()


def test_bench_generate_tables_are_parsed():
    text = ("model: ...\n\nbatch 1 with CFG\n| method | tokens/s (wall) | tokens/CPU-s | ours / method (wall) | x |\n"
            "|---|---|---|---|---|\n| ours (batched CFG, 1 forward/token) | 120.5 (runs 120.5) | 1 | 1.00x | 1 |\n"
            "| (a) transformers generate + Lumina processors | 60.0 (runs 60.0) | 1 | 2.01x | 1 |\n\nscaling\n"
            "| samples per batch | tokens/s (wall) | x |\n|---|---|---|\n| 1 | 120.0 | 1 |\n| 8 | 700.0 | 1 |\n")
    tables = gpu_check.markdown_tables(text)
    assert [len(t) for t in tables] == [2, 2]
    assert tables[0][1][3] == "2.01x" and tables[1][1][:2] == ["8", "700.0"]


@pytest.mark.parametrize("sizes", [gpu_check.Sizes(), gpu_check.REHEARSAL], ids=["gpu", "rehearsal"])
def test_encode_sizes_pass_bench_pretokenizes_own_argument_checks(sizes):
    from bench_pretokenize import parse_args

    a = parse_args([*sizes.encode_args, "--device", "cpu"])  # exits 2 if --images < 3 x --batch_size
    assert a.images >= 3 * a.batch_size


def test_the_gpu_limits_fit_the_device_lease():
    # 15 minutes of device time: start-up (~2 min), the budget, and a rerun of the same must fit
    assert gpu_check.DEFAULT_BUDGET_S["gpu"] <= 360
    assert max(c.limit_s for c in gpu_check.CHECKS) <= gpu_check.DEFAULT_BUDGET_S["gpu"] / 3


def test_training_check_config_has_about_a_billion_parameters_and_fits_an_80GB_gpu():
    from model.training.planner import Model, Settings, plan_memory

    m = Model.from_config(gpu_check.train_config())
    assert 0.9e9 < m.n_params < 1.2e9 and m.config.vocab_size == 65536
    plan = plan_memory(m, Settings(**gpu_check.TRAIN_SETTINGS, world_size=1))
    assert plan["per_rank_bytes"] < 80e9


def test_records_helper_writes_a_data_set_the_trainer_reads(tmp_path):
    from data.loader import build_train_data

    cfg = gpu_check.write_records(tmp_path, n=16)
    data = build_train_data(cfg, max_seq_len=64, micro_batch_size=4, accum_iter=1, world_size=1, rank=0, seed=0,
                            pad_id=1)
    data.sampler.set_epoch(0)
    batches = list(data.loader)
    assert len(batches) == 4 and batches[0]["input_ids"].shape[0] == 4


def test_gpu_prepare_refuses_bad_arguments():
    res = sh("--also", "transformers", script=["bash", "bench/gpu_prepare.sh"])
    assert res.returncode == 2 and "--also needs NAME==VERSION" in res.stderr


@pytest.mark.slow
def test_train_figures_survive_a_planner_that_raises(monkeypatch, capsys, tmp_path):
    from model.training import planner

    def broken(*a, **k):
        raise KeyError("no such precision")

    monkeypatch.setattr(planner, "plan_memory", broken)
    assert gpu_check.main(["train", "--rehearse-cpu", "--work", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(gpu_check.PREFIX))
    rec = json.loads(line[len(gpu_check.PREFIX):])
    assert not rec["ok"] and "planning failed: KeyError" in rec["note"]
    assert rec["metrics"]["tokens_per_s"] > 0 and rec["metrics"]["params"] > 0


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_check_end_to_end(tmp_path):
    """The same sections, arguments and output parsing as on a GPU, at tiny sizes on the CPU (gloo, bf16)."""
    out = tmp_path / "out"
    res = sh("--rehearse-cpu", "--out", str(out), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (out / "table.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| check")]
    assert [r.split("|")[1].strip() for r in rows] == list(gpu_check.SECTIONS)
    assert all(r.split("|")[2].strip() == "ok" for r in rows), table
    assert "bitwise_equal True" in table and "backend gloo" in table and "share_of_codes_equal 1.0" in table
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= gpu_check.MAX_FILES and all(p.stat().st_size < 16 << 20 for p in files)
    logs = [f"{s}.log" for s in gpu_check.SECTIONS]  # more checks than MAX_FILES - 1: one checks.log
    assert sorted(p.name for p in files) == sorted(["table.md"] + (logs if len(logs) < gpu_check.MAX_FILES
                                                                   else ["checks.log"]))


def test_rate_of_a_run_seen_done_at_one_poll_is_its_lower_bound_not_a_division_by_zero():
    from bench_pretokenize import POLL_S, rate

    assert rate([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], 2) == pytest.approx(4 / 2.0)  # after the first batch
    # a tiny run (the CPU rehearsal) can finish every image within one poll of its output files
    assert rate([5.0] * 6, 2) == pytest.approx(1 / POLL_S)  # one "batch" at one time: the last image counts

"""bench/gpu_check.sh and bench/gpu_check.py: the parts that run without a GPU (arguments, the skip, the
table, the helpers). The checks themselves need CUDA and are skipped here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dist_helper import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

SCRIPT = ["bash", "bench/gpu_check.sh"]


def sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **env})


def test_help_lists_every_check():
    res = sh("--help")
    assert res.returncode == 0
    for s in gpu_check.SECTIONS:
        assert s in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--only", "train,warp"], "unknown check 'warp'"),
    (["--out"], "--out needs a directory"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    res = sh(*args)
    assert res.returncode == 2 and message in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_skips_with_exit_77_and_says_why(tmp_path):
    res = sh("--out", str(tmp_path / "o"))
    assert res.returncode == 77
    assert "SKIPPED: no CUDA GPU" in res.stderr
    assert not (tmp_path / "o").exists()  # nothing was run
    assert gpu_check.main(["train", "--out", str(tmp_path)]) == 77


def test_table_reports_each_check_and_the_missing_ones(tmp_path):
    lines = [gpu_check.PREFIX + json.dumps({"section": "train", "ok": True, "metrics": {"tokens_per_s": 1234, "mfu": 0.41},
                                            "note": "n"}),
             "noise from a log",
             gpu_check.PREFIX + json.dumps({"section": "resume", "ok": False, "metrics": {"bitwise_equal": False},
                                            "note": "m"})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    rows = gpu_check.table(str(tmp_path / "r.jsonl")).splitlines()
    assert len(rows) == 2 + len(gpu_check.SECTIONS)
    assert "| train | ok | tokens_per_s 1234, mfu 0.41 | n |" in rows
    assert "| resume | FAILED | bitwise_equal False | m |" in rows
    assert any(r.startswith("| pretok | NOT RUN |") for r in rows)


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

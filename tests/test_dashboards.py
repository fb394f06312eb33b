"""--tensorboard and --wandb for real (model/training/dashboards.py): the scalars of metrics.jsonl come back from the
TensorBoard event files and from W&B's offline run files, across a resume; a missing package is a clear error.
W&B never touches the network here: offline mode, silent, every W&B folder in the test's temp dir."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

import finetune_solver
from test_trainer import assets, metrics, solve  # noqa: F401 - fixture

FLAGS = ("--batch_size", "2", "--accum_iter", "2", "--save_iteration_interval", "2", "--no_export_hf")


@pytest.mark.parametrize("flag, module", [("--tensorboard", "tensorboard"), ("--wandb", "wandb")])
def test_a_dashboard_asked_for_but_not_installed_stops_with_what_to_install(assets, capsys, monkeypatch,  # noqa: F811
                                                                            flag, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", str(assets["data"]), flag])
    err = capsys.readouterr().err
    assert f"{flag} needs the {module} package" in err and "pip install -e .[dashboards]" in err
    finetune_solver.parse_args(["--data_config", str(assets["data"])])  # not asked for: no error


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_scalar_of_metrics_jsonl_across_a_resume(assets, tmp_path):  # noqa: F811
    solve(assets, tmp_path, *FLAGS, "--tensorboard", "--max_steps", "3")  # logs 1..3, checkpoint at 2 and 3
    solve(assets, tmp_path, *FLAGS, "--tensorboard", "--resume_path", str(tmp_path / "epoch0-iter2"),
          "--max_steps", "5")  # replays step 3 (purged, not doubled), then 4..5
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    tb, rows = _tensorboard_scalars(tmp_path / "tensorboard"), metrics(tmp_path)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    keys = {k for r in rows.values() for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    assert {"loss", "closs", "lr", "grad_norm", "tokens_per_sec", "memory", "loss/default"} <= keys
    assert set(tb) == keys
    for k in keys:
        assert sorted(s for s, _ in tb[k]) == [1, 2, 3, 4, 5], k  # each step once
        for s, v in tb[k]:
            assert v == pytest.approx(rows[s][k], rel=1e-6), (k, s)


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file (.wandb: a LevelDB-style log of 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


@pytest.mark.slow
def test_wandb_offline_run_holds_the_scalars_and_a_resumed_run_continues_the_same_run(assets, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    wb = tmp_path / "wandb_home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(wb / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    flags = (*FLAGS, "--wandb", "--wandb_mode", "offline", "--wandb_project", "proj", "--wandb_run_name", "tiny")
    solve(assets, out, *flags, "--max_steps", "3")
    solve(assets, out, *flags, "--max_steps", "5")  # auto-resume from epoch0-iter3
    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # two sessions of one run
    history: dict[int, dict[str, float]] = {}
    for f in files:
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                assert (rec.run.run_id, rec.run.project, rec.run.display_name) == (run_id, "proj", "tiny")
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                history[rec.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    rows = metrics(out)
    assert sorted(history) == sorted(rows) == [1, 2, 3, 4, 5]
    for s, r in rows.items():
        assert history[s] == {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}, s
    assert "continued" in (out / "common.log").read_text()

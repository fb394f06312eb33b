"""Validation loss (--val_data_config, model/training/evaluation.py) and the per-type curves of metrics.jsonl (type,
loss/{type}), on the tiny model: one rank, two ranks, and across a resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.data_config import load_data_config
from data.dataset import RecordDataset
from data.loader import build_train_data
from dist_helper import make_learnable_data
from model.export_hf import load_lm_from_checkpoint
from test_trainer import assets, metrics, solve  # noqa: F401 - fixture

TRAIN = ("--batch_size", "2", "--accum_iter", "2", "--dropout", "0.1", "--save_iteration_interval", "2",
         "--ckpt_max_keep", "0", "--type_loss_window", "3", "--no_export_hf")
MIXED = "META:\n  - path: record.json\n    type: a\n  - path: record.json\n    type: b\n    ratio: 0.5\n"


@pytest.fixture(scope="module")
def data(assets, tmp_path_factory):  # noqa: F811
    """Training config with two types (a: 32 items, b: 16 drawn per epoch, 12 steps of 4); held-out config
    with two types (9 + 5 items)."""
    root = tmp_path_factory.mktemp("eval_data")
    mixed = assets["data"].parent / "mixed.yaml"
    mixed.write_text(MIXED)
    make_learnable_data(root / "va", n_items=9, seed=1)
    make_learnable_data(root / "vb", n_items=5, seed=2)
    val = root / "val.yaml"
    val.write_text("META:\n  - path: va/record.json\n    type: a\n  - path: vb/record.json\n    type: b\n")
    return {"train": mixed, "val": val}


def flags(data, *extra):
    return ("--data_config", str(data["train"]), *TRAIN, *extra)


@pytest.fixture(scope="module")
def run_eval(assets, data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("eval")
    solve(assets, out, *flags(data, "--val_data_config", str(data["val"]), "--eval_every", "5"))
    return out


@pytest.mark.slow
def test_rows_name_the_type_the_sampler_planned_and_a_windowed_running_loss_per_type(run_eval, data):
    rows = metrics(run_eval)
    assert sorted(rows) == list(range(1, 13))
    plan = build_train_data(data["train"], max_seq_len=4096, micro_batch_size=4, accum_iter=1, world_size=1, rank=0,
                            seed=0, pad_id=0)
    plan.sampler.set_epoch(0)
    planned = [plan.dataset.type_names[t] for t in plan.dataset.types[plan.sampler.global_batches()[:, 0]]]
    assert [rows[s]["type"] for s in range(1, 13)] == planned and set(planned) == {"a", "b"}
    seen: dict[str, list[float]] = {}
    for s in range(1, 13):
        t = rows[s]["type"]
        seen.setdefault(t, []).append(rows[s]["loss"])
        assert rows[s][f"loss/{t}"] == pytest.approx(np.mean(seen[t][-3:]), rel=1e-12), s
        assert not {f"loss/{o}" for o in ("a", "b") if o != t} & set(rows[s])


def _held_out_loss(ckpt, val_yaml, z_loss_weight=1e-3) -> dict[str, float]:
    """val_loss recomputed item by item on the unsharded model of a checkpoint."""
    lm = load_lm_from_checkpoint(ckpt)
    ds = RecordDataset(load_data_config(val_yaml), max_seq_len=4096)
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(len(ds)):
            t = ds.type_names[int(ds.types[i])]
            item = ds[i]
            ids, lab = (torch.from_numpy(item[k].astype(np.int64))[None] for k in ("input_ids", "labels"))
            lab[:, 0] = -100
            out = lm(ids, lab)
            s = sums.setdefault(t, [0.0, 0.0])
            s[0] += float(out.ce_sum) + z_loss_weight * float(out.z_sum)
            s[1] += int(out.n_tokens)
    res = {f"val_loss/{t}": v / n for t, (v, n) in sums.items()}
    res["val_loss"] = sum(v for v, _ in sums.values()) / sum(n for _, n in sums.values())
    res["val_tokens"] = sum(n for _, n in sums.values())
    return res


@pytest.mark.slow
def test_validation_loss_is_the_token_mean_loss_of_the_held_out_items_every_n_steps_and_at_the_epoch_end(
        run_eval, data):
    rows = metrics(run_eval)
    assert [s for s in sorted(rows) if "val_loss" in rows[s]] == [5, 10, 12]  # --eval_every 5, and the epoch end
    want = _held_out_loss(run_eval / "epoch0", data["val"])  # the weights after step 12
    got = rows[12]
    assert got["val_tokens"] == want["val_tokens"]
    for k in ("val_loss", "val_loss/a", "val_loss/b"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert rows[12]["val_loss"] != rows[5]["val_loss"]  # evaluated on the weights of the step, not once


@pytest.mark.slow
def test_evaluation_leaves_the_training_losses_and_the_bitwise_resume_unchanged(assets, data, run_eval,  # noqa: F811
                                                                                 tmp_path):
    solve(assets, tmp_path / "no_eval", *flags(data))
    with_eval, without = metrics(run_eval), metrics(tmp_path / "no_eval")
    for s in without:  # same dropout masks, same data: evaluation draws no random number, moves no sampler
        assert with_eval[s]["loss"] == without[s]["loss"] and with_eval[s]["grad_norm"] == without[s]["grad_norm"], s
    resumed = tmp_path / "resumed"
    val = ("--val_data_config", str(data["val"]), "--eval_every", "5")
    solve(assets, resumed, *flags(data, *val, "--max_steps", "7"))
    solve(assets, resumed, *flags(data, *val))
    assert f"resuming from {resumed / 'epoch0-iter7'}" in (resumed / "common.log").read_text()
    again = metrics(resumed)
    assert sorted(again) == sorted(with_eval)
    for s, row in with_eval.items():
        for k in ("loss", "grad_norm", "type", f"loss/{row['type']}", "val_loss", "val_loss/a", "val_loss/b"):
            assert again[s].get(k) == row.get(k), (s, k)


@pytest.mark.slow
def test_two_ranks_give_the_validation_and_per_type_losses_of_one_rank(assets, data, tmp_path):  # noqa: F811
    """Every flag of issue 12 at once, on 2 ranks (sdp, gloo) and on 1 with the same global batch."""
    common = ("--data_config", str(data["train"]), "--accum_iter", "2", "--max_steps", "4", "--no_export_hf",
              "--val_data_config", str(data["val"]), "--eval_every", "1", "--eval_items", "5",
              "--skip_iterations", "2", "--deterministic", "--tensorboard", "--type_loss_window", "3")
    solve(assets, tmp_path / "one", *common, "--batch_size", "2")
    solve(assets, tmp_path / "two", *common, "--batch_size", "1", "--data_parallel", "sdp", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4] and two[2].get("skipped") and "loss" not in two[2]
    for s in one:
        # the same 5 items each time; on 2 ranks (1 item per batch) rank 1 runs a stand-in forward for the 6th
        assert one[s]["val_tokens"] == two[s]["val_tokens"] == one[1]["val_tokens"]
        for k in ("loss", f"loss/{one[s].get('type')}", "val_loss", "val_loss/a", "val_loss/b"):
            if k in one[s]:
                assert two[s][k] == pytest.approx(one[s][k], rel=1e-5), (s, k)
    assert one[1]["val_tokens"] < _held_out_loss_tokens(data["val"])
    assert list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))


def _held_out_loss_tokens(val_yaml) -> int:
    ds = RecordDataset(load_data_config(val_yaml), max_seq_len=4096)
    return sum(int((ds[i]["labels"][1:] != -100).sum()) for i in range(len(ds)))

"""--trainable (model/training/trainable.py) and --only_save_trainable: what trains, frozen rows bitwise unchanged on 1 and
2 FSDP ranks, no optimizer state for frozen tensors, checkpoints of the trainable part and their base model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import finetune_solver
from model.training import checkpointing as ck
from model.chameleon_lm import build_chameleon_lm, image_token_ids, load_hf_config, read_hf_weights
from model.export_hf import load_lm_from_checkpoint, main as export_main
from model.training.optim import build_optimizer
from model.training.trainable import (EMBED, HEAD, TrainableError, TrainablePlan, apply_trainable, attach_to_optimizer,
                             base_fingerprint, mask_frozen_rows, resolve, shard_row_masks)
from test_trainer import _same_logits, assets, metrics, solve  # noqa: F401 - assets is a fixture

# wd > 0 so that AdamW's decoupled weight decay would move frozen rows if it were applied to them
IMAGE_HEAD = ("--trainable", "image_head", "--wd", "0.1", "--batch_size", "2", "--accum_iter", "2",
              "--max_steps", "4", "--save_iteration_interval", "2", "--only_save_trainable")


@pytest.fixture(scope="module")
def meta_lm(assets):  # noqa: F811
    return build_chameleon_lm(load_hf_config(assets["model"]), device="meta")


def _params(lm):
    return {n: p for n, p in lm.named_parameters()}


def test_presets_and_globs_resolve_to_the_documented_parameters(meta_lm):
    params, cfg = _params(meta_lm), meta_lm.config
    assert resolve(None, params, cfg).full == set(params)  # default: all
    assert resolve("no_embed", params, cfg).full == set(params) - {EMBED}
    norms = resolve("norms", params, cfg).full
    assert "model.norm.weight" in norms and "model.layers.1.self_attn.q_norm.bias" in norms
    assert all("norm" in n for n in norms) and len(norms) == 1 + 2 * 6
    plan = resolve("image_head", params, cfg)
    assert plan.full == set() and set(plan.rows) == {HEAD, EMBED}
    ids = image_token_ids(cfg)
    assert ids[0] == 4 and ids[-1] == 8195
    for m in plan.rows.values():
        assert torch.equal(m.nonzero().squeeze(1), ids)
    both = resolve("image_head, lm_head, model.layers.*.self_attn.*", params, cfg)  # union; whole tensor wins
    assert set(both.rows) == {EMBED} and HEAD in both.full
    assert "model.layers.0.self_attn.q_proj.weight" in both.full and "model.layers.0.mlp.up_proj.weight" not in both.full


def test_a_pattern_that_matches_nothing_is_refused_naming_it(meta_lm):
    with pytest.raises(TrainableError, match="--trainable model.layer.*: matches no parameter"):
        resolve("norms,model.layer.*", _params(meta_lm), meta_lm.config)
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", __file__, "--trainable", " , "])


def test_apply_trainable_freezes_and_counts(assets):  # noqa: F811
    lm = build_chameleon_lm(load_hf_config(assets["model"]), device="meta")
    info = apply_trainable(lm, "image_head,norms")
    p = _params(lm)
    rows = int(lm.trainable_plan.rows[HEAD].sum())
    assert rows == 8192
    norms = sum(v.numel() for n, v in p.items() if "norm" in n)
    assert info["trainable_params"] == 2 * rows * p[HEAD].shape[1] + norms
    assert p[HEAD].requires_grad and not p["model.layers.0.mlp.up_proj.weight"].requires_grad


def test_trainable_rows_get_exactly_adamw_with_weight_decay_and_frozen_rows_nothing():

    class Tiny(torch.nn.Module):  # stands for the head: one [rows, cols] weight with row-level training
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(3, 6, bias=False)

    torch.manual_seed(0)
    ours, ref = Tiny(), Tiny()
    ref.load_state_dict(ours.state_dict())
    ours.config = None
    rows = torch.tensor([False, True, True, False, True, False])
    ours.trainable_plan = TrainablePlan(rows={HEAD: rows})
    shard_row_masks(ours)
    before = ours.lm_head.weight.detach().clone()
    opt = attach_to_optimizer(build_optimizer(ours, lr=0.1, weight_decay=0.5), ours)
    ref_opt = build_optimizer(ref, lr=0.1, weight_decay=0.5)
    for step in range(3):
        x = torch.randn(4, 3)
        for m, o in ((ours, opt), (ref, ref_opt)):
            m.lm_head(x).square().sum().backward()
        mask_frozen_rows(ours)
        assert torch.count_nonzero(ours.lm_head.weight.grad[~rows]) == 0
        ref.lm_head.weight.grad[~rows] = 0
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    w, wr = ours.lm_head.weight.detach(), ref.lm_head.weight.detach()
    assert torch.equal(w[~rows], before[~rows])  # frozen rows: bitwise unchanged
    assert torch.equal(w[rows], wr[rows])  # trainable rows: bitwise what AdamW with weight decay does
    assert not torch.equal(wr[~rows], before[~rows])  # (plain AdamW would have decayed the frozen rows)


def _initial(assets, config):  # noqa: F811
    # through the loader: q/k norms come in the shapes the run trains (grouped, model/qk_norm.py)
    return read_hf_weights(assets["model"], config)


def _check_only_image_rows_moved(assets, ckpt):  # noqa: F811
    lm = load_lm_from_checkpoint(ckpt)
    init = _initial(assets, lm.config)
    ids = image_token_ids(lm.config)
    frozen_rows = torch.ones(lm.config.vocab_size, dtype=torch.bool)
    frozen_rows[ids] = False
    for n, v in lm.state_dict().items():
        if n in (HEAD, EMBED):
            assert torch.equal(v[frozen_rows], init[n][frozen_rows]), n  # bitwise, despite --wd 0.1
            assert not torch.equal(v[ids], init[n][ids]), n
        else:
            assert torch.equal(v, init[n]), n
    # optimizer state: only the two row-level tensors have any; their frozen rows saw only zero gradients
    md = ck.read_dcp_metadata(ckpt).state_dict_metadata
    assert {k for k in md if k.startswith("model.")} == {f"model.{HEAD}", f"model.{EMBED}"}  # only_save_trainable
    opt = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in md if k.startswith("optim.state.")}
    assert opt == {HEAD, EMBED}
    for n in (HEAD, EMBED):
        avg = torch.empty(lm.config.vocab_size, lm.config.hidden_size)
        dcp.load({f"optim.state.{n}.exp_avg": avg}, checkpoint_id=str(ckpt))
        assert torch.count_nonzero(avg[frozen_rows]) == 0 and torch.count_nonzero(avg[ids]) > 0


@pytest.fixture(scope="module")
def run_image_head(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("image_head")
    solve(assets, out, *IMAGE_HEAD)
    return out


@pytest.mark.slow
def test_image_head_moves_only_image_rows_and_keeps_frozen_rows_bitwise(assets, run_image_head):  # noqa: F811
    _check_only_image_rows_moved(assets, run_image_head / "epoch0-iter4")
    m = metrics(run_image_head)
    assert m[4]["trainable_params"] == 2 * 8192 * 64 and m[4]["loss"] < m[1]["loss"]
    assert "trainable: 1048576 of" in (run_image_head / "common.log").read_text()


@pytest.mark.slow
def test_image_head_on_two_ranks_keeps_frozen_rows_bitwise_and_matches_one_rank(assets, run_image_head, tmp_path):  # noqa: F811
    solve(assets, tmp_path, *IMAGE_HEAD, "--batch_size", "1", "--checkpointing", nproc=2)
    _check_only_image_rows_moved(assets, tmp_path / "epoch0-iter4")
    one, two = metrics(run_image_head), metrics(tmp_path)
    for s in (1, 2, 3, 4):
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s


@pytest.mark.slow
def test_only_save_trainable_resumes_bitwise_on_top_of_init_from(assets, run_image_head, tmp_path):  # noqa: F811
    st = ck.read_train_state(run_image_head / "epoch0-iter2")
    assert st["base_model"]["fingerprint"] == base_fingerprint(assets["model"])
    solve(assets, tmp_path, *IMAGE_HEAD, "--resume_path", str(run_image_head / "epoch0-iter2"))
    full, resumed = metrics(run_image_head), metrics(tmp_path)
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert resumed[s]["loss"] == full[s]["loss"] and resumed[s]["grad_norm"] == full[s]["grad_norm"], s
    _check_only_image_rows_moved(assets, tmp_path / "epoch0-iter4")


@pytest.mark.slow
def test_only_save_trainable_refuses_another_base_model_on_resume_and_export(assets, run_image_head, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(assets["model"], other)
    sd = load_file(str(other / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1  # same shapes, different weights
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    ckpt = run_image_head / "epoch0-iter2"
    flags = [*IMAGE_HEAD, "--resume_path", str(ckpt)]
    code = finetune_solver.main(["--init_from", str(other), "--data_config", str(assets["data"]), "--output_dir",
                                 str(tmp_path / "run"), "--precision", "fp32", "--num_workers", "0", *flags])
    log = (tmp_path / "run" / "common.log").read_text()
    assert code == 1 and "is a different model" in log and str(other) in log, log[-2000:]
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--base", str(other)]) == 1
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--base", str(tmp_path / "none")]) == 1
    assert not (tmp_path / "hf").exists()
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0  # the recorded --init_from
    _same_logits(ckpt, tmp_path / "hf")
    assert json.loads((ckpt / "args.json").read_text())["only_save_trainable"] is True

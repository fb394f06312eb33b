"""LoRA through peft (model/training/lora.py): flags, wrapping, training with FSDP2 on 1 and 2 ranks, bitwise resume,
--only_save_trainable, and the exports (merged HF model and peft adapter) giving the LoRA model's logits."""

from __future__ import annotations

import sys

import pytest
import torch

import finetune_solver
from model.training import checkpointing as ck
from model.chameleon_lm import build_chameleon_lm, load_hf_config, read_hf_weights
from model.export_hf import load_lm_from_checkpoint, main as export_main
from model.training.lora import LoraError, apply_lora
from model.training.trainable import EMBED, HEAD, TrainableError, apply_trainable
from test_trainer import assets, metrics, solve  # noqa: F401 - assets is a fixture

LORA = ("--lora_rank", "4", "--lora_alpha", "8", "--lora_targets", "q_proj,v_proj,down_proj", "--wd", "0.1",
        "--batch_size", "2", "--accum_iter", "2", "--save_iteration_interval", "4")
LORA_RUN = (*LORA, "--lora_dropout", "0.1", "--trainable", "image_head", "--only_save_trainable", "--checkpointing")


def _flags(**kw):
    a = finetune_solver.TrainArgs(data_config=__file__, **kw)
    return finetune_solver.validate_args(a)


def test_lora_flags_are_validated_naming_the_flag():
    assert _flags(lora_rank=8) == []
    assert any("--lora_targets 'q_proj,lm_head'" in p for p in _flags(lora_rank=8, lora_targets="q_proj,lm_head"))
    assert any("--lora_dropout" in p for p in _flags(lora_rank=8, lora_dropout=1.0))
    assert any("--lora_rank" in p for p in _flags(lora_rank=-1))
    help_text = finetune_solver.build_parser().format_help()
    for f in ("--lora_rank", "--lora_alpha", "--lora_dropout", "--lora_targets", "--trainable", "image_head",
              "--only_save_trainable"):
        assert f in help_text, f


def test_missing_peft_is_a_clear_error_naming_the_extra(assets, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "peft", None)
    lm = build_chameleon_lm(load_hf_config(assets["model"]), device="meta")
    with pytest.raises(LoraError, match=r"pip install -e \.\[lora\]"):
        apply_lora(lm, {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0, "lora_targets": "q_proj"})


def test_lora_wraps_only_decoder_targets_and_composes_with_trainable(assets):  # noqa: F811
    lm = build_chameleon_lm(load_hf_config(assets["model"]), device="meta")
    assert apply_lora(lm, {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0, "lora_targets": "q_proj,down_proj"})
    info = apply_trainable(lm, "image_head", lora=True)
    train = {n for n, p in lm.named_parameters() if p.requires_grad}
    lora = {n for n in train if ".lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q_proj, down_proj) x (A, B)
    assert train - lora == {HEAD, EMBED} and type(lm.lm_head).__name__ == "LMHeadWithLoss"
    assert info["trainable_params"] == 2 * 8192 * 64 + 2 * (4 * 64 + 64 * 4) + 2 * (4 * 256 + 64 * 4)
    with pytest.raises(TrainableError, match="only weights LoRA wraps"):
        apply_trainable(lm, "model.layers.0.self_attn.q_proj.weight", lora=True)


@pytest.fixture(scope="module")
def run_lora(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lora")
    solve(assets, out, *LORA_RUN)
    return out


@pytest.mark.slow
def test_lora_trains_adapters_and_image_rows_and_keeps_the_base_bitwise(assets, run_lora):  # noqa: F811
    m = metrics(run_lora)
    assert sorted(m) == list(range(1, 9)) and m[8]["loss"] < m[1]["loss"]
    lm = load_lm_from_checkpoint(run_lora / "epoch0")
    init = read_hf_weights(assets["model"], lm.config)  # q/k norms in the shapes the run trains (grouped)
    for n, v in lm.state_dict().items():
        if ".lora_B." in n:
            assert v.abs().sum() > 0, n  # B starts at zero: it moved
        elif ".lora_" not in n and n not in (HEAD, EMBED):
            assert torch.equal(v, init[n.replace(".base_layer.", ".")]), n
    md = ck.read_dcp_metadata(run_lora / "epoch0").state_dict_metadata
    saved = {k[len("model."):] for k in md if k.startswith("model.")}
    assert saved == {n for n, _ in lm.named_parameters() if ".lora_" in n} | {HEAD, EMBED}


def _logits(model, ids):
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return model.lm_head(hidden)  # full vocabulary (transformers' forward masks image-code logits)


@pytest.mark.slow
def test_merged_export_and_peft_adapter_give_the_lora_models_logits(assets, run_lora, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import ChameleonForConditionalGeneration

    ids = torch.randint(9000, 10700, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[0, 5:12] = torch.arange(100, 107)
    assert export_main(["--ckpt", str(run_lora / "epoch0-iter4"), "--out", str(tmp_path / "hf4")]) == 0
    for ckpt, hf_dir in ((run_lora / "epoch0", run_lora / "epoch0" / "hf"), (run_lora / "epoch0-iter4", tmp_path / "hf4")):
        ours = load_lm_from_checkpoint(ckpt).logits(ids)
        merged = ChameleonForConditionalGeneration.from_pretrained(hf_dir).eval()
        assert not any(".lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(_logits(merged, ids), ours, rtol=0, atol=2e-5)
        assert {p.name for p in (hf_dir / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
        base = ChameleonForConditionalGeneration.from_pretrained(assets["model"]).eval()
        assert not torch.allclose(_logits(base, ids), ours, atol=1e-3)  # the adapter does change the model
        with_adapter = PeftModel.from_pretrained(base, hf_dir / "adapter").eval()
        torch.testing.assert_close(_logits(with_adapter.base_model.model, ids), ours, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_lora_stop_and_resume_gives_identical_losses(assets, run_lora, tmp_path):  # noqa: F811
    solve(assets, tmp_path, *LORA_RUN, "--max_steps", "3", "--no_export_hf")
    assert ck.latest_checkpoint(tmp_path).name == "epoch0-iter3"
    solve(assets, tmp_path, *LORA_RUN, "--no_export_hf")
    full, resumed = metrics(run_lora), metrics(tmp_path)
    assert sorted(resumed) == list(range(1, 9))
    for s in full:  # bitwise: same batches, LoRA dropout masks and optimizer state
        assert resumed[s]["loss"] == full[s]["loss"] and resumed[s]["grad_norm"] == full[s]["grad_norm"], s


@pytest.mark.slow
def test_lora_on_two_ranks_matches_one_rank(assets, tmp_path):  # noqa: F811
    flags = (*LORA, "--trainable", "lm_head", "--max_steps", "2", "--no_export_hf")
    solve(assets, tmp_path / "one", *flags)
    solve(assets, tmp_path / "two", *flags, "--batch_size", "1", "--data_parallel", "sdp", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for s in (1, 2):
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4), s

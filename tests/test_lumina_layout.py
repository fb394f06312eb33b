"""Round trip with Lumina-mGPT's layout: its q/k norms trained as [model_parallel_size, head_dim] groups,
exported for transformers and for Lumina's own tools, read back with the same logits.

The Lumina-format input is written here by hand, as Lumina's ``save_pretrained`` writes it (config keys of
its ChameleonXLLMXConfig, q/k norms [model_parallel_size, head_dim], two safetensors shards and an index,
no VQ model), independently of our writer in model/lumina_layout.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import finetune_solver
from dist_helper import make_learnable_data, run, torchrun
from model.chameleon_lm import ChameleonLM, build_chameleon_lm, load_hf_config, read_hf_weights
from model.training.checkpointing import read_dcp_metadata
from model.lumina_layout import LuminaLayoutError, choose_qk_norm_groups, lumina_config, save_lumina
from model.make_tiny_model import make_tiny_model
from model.qk_norm import GroupedQKNorm, NORM_KEY_RE, decide_groups

MP = 2  # the Lumina checkpoint's model_parallel_size; the tiny model has 4 heads of 16 dims
HEADS, HEAD_DIM = 4, 16
TIMEOUT = 180


def write_lumina_checkpoint(src: Path, out: Path, *, mp: int = MP, seed: int = 0) -> Path:
    """``src`` (transformers' layout) rewritten as a Lumina-mGPT release: per-shard q/k norms that differ
    between shards, Lumina's config keys, two shards with model.safetensors.index.json, no VQ weights."""
    out.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg.pop("dtype", None)
    cfg.update(architectures=["ChameleonXLLMXForConditionalGeneration"], model_parallel_size=mp, swin_norm=False,
               mask_image_logits=True, dropout=0.05, z_loss_weight=1e-5, rope_theta=rope.get("rope_theta", 1e4),
               rope_scaling=None, torch_dtype="float32", transformers_version="4.44.2")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = {k: v for k, v in load_file(src / "model.safetensors").items() if ".vqmodel." not in k}
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        if NORM_KEY_RE.match(k):
            base = 1.0 if k.endswith("weight") else 0.0
            sd[k] = base + 0.3 * torch.randn(mp, HEAD_DIM, generator=g)
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return out


class LuminaQKNorm(nn.Module):
    """Lumina's q/k norm written from its equations (not from our module): layer norm over head_dim without
    affine, then head h takes the affine of shard h // (heads / model_parallel_size)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, heads: int):
        super().__init__()
        shard = torch.arange(heads) // (heads // weight.shape[0])
        self.w, self.b = weight.float()[shard], bias.float()[shard]

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.w + self.b


def _lm_from_dir(d: Path) -> ChameleonLM:
    """How generation and --init_from read a directory: grouping decided from its tensors, then loaded."""
    cfg = load_hf_config(d)
    cfg.qk_norm_groups = choose_qk_norm_groups(d, cfg)
    lm = build_chameleon_lm(cfg)
    lm.load_state_dict(read_hf_weights(d, cfg))
    return lm.eval()


def _ids() -> torch.Tensor:
    ids = torch.randint(9000, 10700, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[0, 5:12] = torch.arange(100, 107)  # image codes in the input
    return ids


def _stored(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors shards, as stored."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def assets(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina_assets")
    hf = make_tiny_model(tiny_bundle, root / "hf_model", seed=0)
    return {"hf": hf, "lumina": write_lumina_checkpoint(hf, root / "lumina_model"),
            "data": make_learnable_data(root / "data", n_items=16)}


def _flags(assets, out: Path, *extra: str) -> list[str]:
    return ["--init_from", str(assets["lumina"]), "--data_config", str(assets["data"]), "--output_dir", str(out),
            "--precision", "fp32", "--num_workers", "0", "--log_every", "1", "--lr", "1e-2", "--warmup_epochs", "0",
            "--batch_size", "1", "--accum_iter", "2", "--dropout", "0.1", "--checkpointing",
            "--save_iteration_interval", "2", "--export_layout", "both", *extra]


@pytest.fixture(scope="module")
def run_2rank(assets, tmp_path_factory):
    """4 steps on 2 ranks (gloo) from the Lumina checkpoint; epoch0-iter2 and epoch0 (+ hf/, lumina/)."""
    out = tmp_path_factory.mktemp("lumina_2rank")
    run(torchrun(2, ["finetune_solver.py", *_flags(assets, out)]), timeout=TIMEOUT)
    return out


# ----------------------------------------------------------------------------------------------------------
# the module and the decision (fast)


def test_grouped_norm_equals_the_per_head_norm_with_repeated_rows_and_sums_their_gradients():
    from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, HEADS, HEAD_DIM, generator=g)
    grouped = GroupedQKNorm(MP, HEAD_DIM, HEADS)
    with torch.no_grad():
        grouped.weight.copy_(torch.randn(MP, HEAD_DIM, generator=g))
        grouped.bias.copy_(torch.randn(MP, HEAD_DIM, generator=g))
    per_head = ChameleonLayerNorm((HEADS, HEAD_DIM))
    with torch.no_grad():
        per_head.weight.copy_(grouped.weight.repeat_interleave(HEADS // MP, 0))
        per_head.bias.copy_(grouped.bias.repeat_interleave(HEADS // MP, 0))
    y, y_ref = grouped(x), per_head(x)
    assert torch.equal(y, y_ref)
    assert torch.allclose(y, LuminaQKNorm(grouped.weight.detach(), grouped.bias.detach(), HEADS)(x), atol=1e-5)
    (y * y).sum().backward()
    (y_ref * y_ref).sum().backward()
    summed = per_head.weight.grad.view(MP, HEADS // MP, HEAD_DIM).sum(1)
    assert torch.allclose(grouped.weight.grad, summed, rtol=1e-6, atol=1e-6)


def test_grouping_is_lumina_model_parallel_size_or_the_smallest_exact_one_or_per_head(assets):
    cfg = load_hf_config(assets["hf"])

    def norms(rows_of: callable) -> dict:
        return {f"model.layers.{i}.self_attn.{n}.{p}": rows_of() for i in range(2) for n in ("q_norm", "k_norm")
                for p in ("weight", "bias")}

    g = torch.Generator().manual_seed(1)
    lumina = norms(lambda: torch.randn(MP, HEAD_DIM, generator=g))
    assert decide_groups(lumina, cfg)[0] == MP  # stored [mp, head_dim]: Lumina's groups as they are
    repeated = {k: v.repeat_interleave(HEADS // MP, 0) for k, v in lumina.items()}  # Meta's conversion
    assert decide_groups(repeated, cfg)[0] == MP
    equal = norms(lambda: torch.ones(HEADS, HEAD_DIM))
    assert decide_groups(equal, cfg)[0] == 1  # the smallest grouping that reproduces it
    cfg.qk_norm_groups = 2
    assert decide_groups(equal, cfg)[0] == 2  # a grouping our own export records is kept
    differ = norms(lambda: torch.randn(HEADS, HEAD_DIM, generator=g))
    assert decide_groups(differ, cfg)[0] is None  # heads differ: independent per-head affines


def test_per_head_checkpoint_whose_heads_differ_keeps_per_head_norms_and_refuses_the_lumina_layout(
        assets, tmp_path, caplog):
    from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

    caplog.set_level(logging.INFO, logger="model.lumina_layout")
    src = tmp_path / "per_head"
    src.mkdir()
    (src / "config.json").write_text((assets["hf"] / "config.json").read_text())
    sd = load_file(assets["hf"] / "model.safetensors")
    sd["model.layers.1.self_attn.k_norm.bias"] = torch.arange(HEADS * HEAD_DIM, dtype=torch.float32).view(HEADS, -1)
    save_file(sd, str(src / "model.safetensors"))
    lm = _lm_from_dir(src)
    norm = lm.model.layers[0].self_attn.q_norm
    assert type(norm) is ChameleonLayerNorm and norm.weight.shape == (HEADS, HEAD_DIM)
    assert lm.config.qk_norm_groups is None
    assert "q/k-norm layout: per head" in caplog.text
    with pytest.raises(LuminaLayoutError, match="per head and differ"):
        save_lumina(lm.state_dict(), lm.config, tmp_path / "out", dtype=torch.float32)
    assert not (tmp_path / "out").exists()
    data = make_learnable_data(tmp_path / "data", n_items=8)
    code = finetune_solver.main(["--init_from", str(src), "--data_config", str(data), "--output_dir",
                                 str(tmp_path / "run"), "--precision", "fp32", "--num_workers", "0",
                                 "--export_layout", "lumina"])
    assert code == 1
    assert "--export_layout lumina: Lumina-mGPT's layout cannot hold this model" in (
        tmp_path / "run" / "common.log").read_text()


def test_export_layout_flag_asks_for_epoch_exports(assets, capsys):
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--data_config", str(assets["data"]), "--export_layout", "both", "--no_export_hf"])
    assert "--export_layout both asks for epoch exports" in capsys.readouterr().err
    assert finetune_solver.parse_args(["--data_config", str(assets["data"])]).export_layout == "hf"


def test_lumina_export_is_sharded_with_an_index_in_the_asked_dtype_without_vq_weights(assets, tmp_path):
    lm = _lm_from_dir(assets["lumina"])
    assert lm.config.qk_norm_groups == MP
    out = save_lumina(lm.state_dict(), lm.config, tmp_path / "lumina", dtype=torch.bfloat16,
                      flags={"dropout": 0.05, "z_loss_weight": 1e-5, "mask_image_logits": False},
                      max_shard_bytes=2_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    stored = _stored(out)
    assert set(stored) == set(index["weight_map"]) == set(lm.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in stored.values())
    assert all(v.dtype == torch.bfloat16 for v in stored.values()) and not any(".vqmodel." in k for k in stored)
    assert stored["model.layers.0.self_attn.k_norm.bias"].shape == (MP, HEAD_DIM)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["ChameleonXLLMXForConditionalGeneration"]
    assert (cfg["model_parallel_size"], cfg["swin_norm"], cfg["mask_image_logits"], cfg["dropout"],
            cfg["z_loss_weight"], cfg["torch_dtype"], cfg["rope_scaling"]) == (MP, False, False, 0.05, 1e-5,
                                                                                "bfloat16", None)
    assert "qk_norm_groups" not in cfg and "rope_parameters" not in cfg and cfg["rope_theta"] == 10000.0
    # the release we started from, loaded and re-exported in fp32, is the same tensors in the same shapes
    again = save_lumina(lm.state_dict(), lm.config, tmp_path / "fp32", dtype=torch.float32)
    before, after = _stored(assets["lumina"]), _stored(again)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lumina_config_maps_rope_scaling_and_keeps_lumina_keys(assets):
    cfg = load_hf_config(assets["lumina"])
    cfg.qk_norm_groups = MP
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    d = lumina_config(cfg, model_parallel_size=MP, dtype=torch.float16)
    assert (d["rope_theta"], d["rope_scaling"], d["torch_dtype"]) == (5e5, {"type": "linear", "factor": 2.0}, "float16")


# ----------------------------------------------------------------------------------------------------------
# training from a Lumina checkpoint on 2 ranks, exports, resume (end to end)


@pytest.mark.slow
def test_lumina_checkpoint_trains_on_two_ranks_with_one_affine_per_shard(assets, run_2rank):
    log = (run_2rank / "common.log").read_text()
    assert "q/k-norm layout: 2 group(s)" in log and "Lumina layout" in log
    assert sorted(_metrics(run_2rank)) == [1, 2, 3, 4]
    ckpt = run_2rank / "epoch0"
    assert json.loads((ckpt / "config.json").read_text())["qk_norm_groups"] == MP
    shapes = {k: tuple(v.size) for k, v in read_dcp_metadata(ckpt).state_dict_metadata.items()
              if NORM_KEY_RE.match(k) or k.endswith(("_norm.weight.exp_avg", "_norm.bias.exp_avg_sq"))}
    assert len(shapes) == 2 * 2 * 2 * 2  # layers x (q, k) x (weight, bias) x (model, one optimizer moment)
    assert set(shapes.values()) == {(MP, HEAD_DIM)}, shapes
    # the transformers export repeats each shard's affine over its heads: bitwise equal within shards
    hf = load_file(ckpt / "hf" / "model.safetensors")
    start = read_hf_weights(assets["lumina"], load_hf_config(assets["lumina"]))
    for k, v in hf.items():
        if NORM_KEY_RE.match(k):
            blocks = v.view(MP, HEADS // MP, HEAD_DIM)
            assert torch.equal(blocks, blocks[:, :1].expand_as(blocks)), k
            assert not torch.equal(v, start[k]), k  # trained
    # Lumina's layout holds the same rows, [model_parallel_size, head_dim]
    lumina = _stored(ckpt / "lumina")
    assert set(lumina) == {k for k in hf if ".vqmodel." not in k}
    for k, v in lumina.items():
        assert torch.equal(v, hf[k][:: HEADS // MP] if NORM_KEY_RE.match(k) else hf[k]), k
    cfg = json.loads((ckpt / "lumina" / "config.json").read_text())
    assert (cfg["model_parallel_size"], cfg["dropout"], cfg["z_loss_weight"]) == (MP, 0.1, 0.0)


@pytest.mark.slow
def test_lumina_export_read_back_gives_the_logits_of_the_hf_export_and_of_lumina_equations(run_2rank, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    from model.export_hf import load_lm_from_checkpoint, main as export_main

    ckpt, ids = run_2rank / "epoch0", _ids()
    trained = load_lm_from_checkpoint(ckpt).logits(ids)
    from_lumina = _lm_from_dir(ckpt / "lumina")
    assert from_lumina.config.qk_norm_groups == MP
    from_hf = _lm_from_dir(ckpt / "hf")
    assert torch.equal(from_lumina.logits(ids), trained) and torch.equal(from_hf.logits(ids), trained)
    hf = ChameleonForConditionalGeneration.from_pretrained(ckpt / "hf").eval()
    with torch.no_grad():
        theirs = hf.lm_head(hf.model(input_ids=ids, use_cache=False).last_hidden_state)
        assert torch.equal(theirs, trained)
        lumina_sd = _stored(ckpt / "lumina")
        for i, layer in enumerate(hf.model.layers):  # Lumina's equations with Lumina's [mp, head_dim] tensors
            for name in ("q_norm", "k_norm"):
                p = f"model.layers.{i}.self_attn.{name}."
                setattr(layer.self_attn, name, LuminaQKNorm(lumina_sd[p + "weight"], lumina_sd[p + "bias"], HEADS))
        reference = hf.lm_head(hf.model(input_ids=ids, use_cache=False).last_hidden_state)
    assert torch.allclose(reference, trained, atol=1e-4, rtol=1e-4)
    # the CLI, bf16 as Lumina's releases
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bf16"), "--layout", "lumina",
                        "--dtype", "bf16"]) == 0
    bf16 = _stored(tmp_path / "bf16")
    assert len(bf16) > 10 and all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert math.isclose(json.loads((tmp_path / "bf16" / "config.json").read_text())["dropout"], 0.1)


@pytest.mark.slow
def test_a_resumed_lumina_run_gives_the_same_losses_and_weights_bitwise(assets, run_2rank, tmp_path):
    run(torchrun(2, ["finetune_solver.py", *_flags(assets, tmp_path, "--resume_path",
                                                     str(run_2rank / "epoch0-iter2"))]), timeout=TIMEOUT)
    assert "as recorded in" in (tmp_path / "common.log").read_text()
    full, resumed = _metrics(run_2rank), _metrics(tmp_path)
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert resumed[s]["loss"] == full[s]["loss"] and resumed[s]["grad_norm"] == full[s]["grad_norm"], s
    a, b = _stored(run_2rank / "epoch0" / "lumina"), _stored(tmp_path / "epoch0" / "lumina")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

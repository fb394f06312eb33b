"""The memory and compute planner (model/training/planner.py, finetune_solver.py --plan, PLAN=1 exps/*.sh)."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from dist_helper import REPO, free_port, run, spawn
import finetune_solver
from model.training import planner
from model.chameleon_lm import build_chameleon_lm, load_hf_config
from model.make_tiny_model import make_tiny_model


def _closed_form_params(c: dict) -> int:
    """Parameters of a Chameleon decoder + head from its config (per-head q/k LayerNorm affines, as
    transformers builds them), written out by hand to check the meta-device count independently."""
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d = h // heads
    attn = h * h + 2 * h * kv * d + h * h + 2 * heads * d + 2 * kv * d
    layer = attn + 3 * h * i + 2 * h
    return n * layer + 2 * v * h + h


@pytest.mark.parametrize("size, published", [("7B", 7_013_666_816), ("34B", 34_294_308_864)])
def test_presets_have_the_published_chameleon_parameter_counts(size, published):
    m = planner.Model.build(None, size)
    assert m.n_params == published == _closed_form_params(planner.PRESETS[size])
    assert round(m.n_params / 1e9, 1) == {"7B": 7.0, "34B": 34.3}[size]  # the sizes Meta and Lumina publish
    assert m.n_params_no_embed == published - 65536 * m.config.hidden_size
    assert sum(u.numel for u in m.units_fsdp) == published  # every parameter in exactly one FSDP unit


def _tiny_cfg(hidden=64, layers=2, vocab=10760):
    from transformers import ChameleonConfig

    cfg = ChameleonConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                          vocabulary_map=planner.chameleon_vocabulary_map(vocab))
    cfg._attn_implementation = "sdpa"
    return cfg


def test_simulated_activations_equal_the_bytes_a_real_forward_keeps():
    """The FakeTensor simulation counts what a real CPU forward of the same decoder keeps alive."""
    from torch.profiler import ProfilerActivity, profile

    cfg = _tiny_cfg()
    sim = planner.simulate_micro_batch(cfg, n_layers=2, batch_size=2, seq_len=256, precision="fp32",
                                       checkpointing=False, dropout=0.0, z_loss_weight=0.0, mask_image_logits=True,
                                       loss_chunk_size=128)
    torch.manual_seed(0)
    lm = build_chameleon_lm(cfg, device="cpu")
    ids = torch.randint(8196, cfg.vocab_size, (2, 256))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        hidden = lm.model(input_ids=ids, use_cache=False).last_hidden_state
    live = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert hidden.shape == (2, 256, 64)
    assert abs(sim.act_end - live) <= 0.02 * live, (sim.act_end, live)


def test_activations_extrapolated_in_batch_size_equal_a_direct_simulation():
    cfg = _tiny_cfg()
    kw = dict(seq_len=33, precision="fp32", checkpointing=True, dropout=0.1, z_loss_weight=1e-4,
              mask_image_logits=True, loss_chunk_size=32)
    am = planner.ActivationModel(cfg, **kw)
    direct = planner.Activations.simulate(cfg, batch_size=4, **kw)
    assert dataclasses.asdict(am.at(4)) == pytest.approx(dataclasses.asdict(direct), rel=1e-3)


def test_checkpointing_keeps_one_hidden_state_per_layer():
    cfg = _tiny_cfg()
    act = planner.Activations.simulate(cfg, batch_size=2, seq_len=64, precision="bf16", checkpointing=True,
                                       dropout=0.0, z_loss_weight=0.0, mask_image_logits=False, loss_chunk_size=32)
    assert act.per_layer == 2 * 64 * 64 * 2  # [B, S, hidden] bf16: the layer's input, nothing else


def _units_of_the_real_fully_shard(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from model.training.parallelize import parallelize

    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        m = planner.Model.build(None, "7B")
        lm = build_chameleon_lm(m.config, device="meta")
        parallelize(lm, init_device_mesh("cpu", (world,)), precision="bf16", checkpointing=True)
        names = {id(p): n.replace("._checkpoint_wrapped_module", "") for n, p in lm.named_parameters()}
        real = {}
        for mod in lm.modules():
            if isinstance(mod, FSDPModule):
                group = mod._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    real[frozenset(names[id(fp.sharded_param)] for fp in group.fsdp_params)] = group.fsdp_params
        plan_units = {frozenset(u.shapes): u for u in m.units_fsdp}
        assert set(real) == set(plan_units)  # the same units, each with the same parameters
        per_rank_local, per_rank_padded = 0, 0
        for key, fps in real.items():
            unit = plan_units[key]
            for fp in fps:
                shape = unit.shapes[names[id(fp.sharded_param)]]
                local = fp.sharded_param.to_local()
                assert local.shape[0] == planner.local_rows(shape[0], world, rank)
                assert local.numel() == planner.local_rows(shape[0], world, rank) * math.prod(shape[1:])
                per_rank_local += local.numel()
                per_rank_padded += fp._sharded_param_data.numel()
        assert per_rank_padded == sum(u.shard_numel(world) for u in m.units_fsdp)
        assert per_rank_local <= per_rank_padded <= per_rank_local + world * sum(len(u.shapes) for u in m.units_fsdp) * 4096
    finally:
        dist.destroy_process_group()


def test_plan_shard_sizes_equal_the_real_fully_shard_of_7B_on_two_gloo_ranks():
    port = str(free_port())
    spawn(_units_of_the_real_fully_shard, 2, timeout=180, env_for_rank=lambda r: {
        "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle, tmp_path_factory):
    return make_tiny_model(tiny_bundle, tmp_path_factory.mktemp("plan_model") / "model", seed=0)


def _plan(capsys, *flags) -> str:
    assert not dist.is_initialized()
    code = finetune_solver.main(["--plan", *flags])
    assert code == 0
    assert not dist.is_initialized()  # no process group, no device touched
    return capsys.readouterr().out


def test_plan_json_has_the_documented_keys_and_needs_no_data_config(tiny_model, capsys):
    out = _plan(capsys, "--init_from", str(tiny_model), "--world_size", "4", "--batch_size", "2", "--max_seq_len", "512",
                "--precision", "bf16", "--json")
    p = json.loads(out)
    for key in ("n_params", "n_trainable", "params_per_rank", "per_rank_bytes", "allocated_peak_bytes", "fits",
                "breakdown", "phases", "components", "activations", "compute", "suggestions", "settings", "model"):
        assert key in p, key
    m = planner.Model.build(str(tiny_model), "7B")
    assert p["n_params"] == m.n_params and p["settings"]["world_size"] == 4 and p["fits"] is True
    assert p["per_rank_bytes"] == sum(p["breakdown"].values())
    assert p["params_per_rank"] == sum(u.shard_numel(4) for u in m.units_fsdp)
    assert p["breakdown"]["sharded_params"] == 4 * p["params_per_rank"]
    c = p["compute"]
    assert c["tokens_per_s"] == pytest.approx(c["tokens_per_step"] / c["step_time_s"])
    assert c["step_time_s"] == pytest.approx(c["model_flops_per_step"] / 4 / (989e12 * 0.4))


def test_plan_with_compile_says_so_and_plans_the_same_memory_and_flops(tiny_model, capsys):
    flags = ("--init_from", str(tiny_model), "--world_size", "2", "--batch_size", "2", "--max_seq_len", "512")
    eager = json.loads(_plan(capsys, *flags, "--json"))
    compiled = json.loads(_plan(capsys, *flags, "--compile", "--json"))
    assert compiled["compile"]["on"] is True and eager["compile"]["on"] is False
    assert compiled["compile"]["memory_change_bytes"] == 0 and "measure" in compiled["compile"]["note"]
    assert compiled["per_rank_bytes"] == eager["per_rank_bytes"] and compiled["compute"] == eager["compute"]
    text = _plan(capsys, *flags, "--compile")
    assert "compiled layers on" in text and "planned memory and FLOPs are those without it" in text


def test_plan_that_does_not_fit_suggests_checkpointing_and_a_smaller_batch(tiny_model, capsys):
    flags = ["--init_from", str(tiny_model), "--world_size", "8", "--batch_size", "8", "--accum_iter", "1",
             "--max_seq_len", "1024", "--precision", "fp32", "--gpu", "A100", "--json"]
    p = json.loads(_plan(capsys, *flags))
    with_ck, without = p["per_rank_bytes_other_checkpointing"], p["per_rank_bytes"]
    assert with_ck < without
    limit = (with_ck + without) / 2 / 1e9
    p = json.loads(_plan(capsys, *flags, "--gpu_memory_gb", str(limit)))
    assert p["fits"] is False
    changes = [s["change"] for s in p["suggestions"]]
    assert changes[0] == "--checkpointing"
    assert any(c.startswith("--batch_size") and "(same global batch)" in c for c in changes)
    for s in p["suggestions"]:
        assert s["settings"]["global_batch"] >= p["settings"]["global_batch"]
    text = planner.format_plan(p)  # what --plan prints without --json
    assert "DOES NOT FIT" in text and "nearest settings that fit:" in text and "--checkpointing" in text


def test_plan_counts_only_the_trainable_parameters_of_trainable_and_lora_runs(tiny_model, capsys):
    flags = ["--init_from", str(tiny_model), "--world_size", "2", "--batch_size", "1", "--max_seq_len", "256",
             "--precision", "fp32", "--json"]
    full = json.loads(_plan(capsys, *flags))
    norms = json.loads(_plan(capsys, *flags, "--trainable", "norms"))
    lora = json.loads(_plan(capsys, *flags, "--lora_rank", "4"))
    lm = build_chameleon_lm(load_hf_config(tiny_model), device="meta")
    assert norms["n_trainable"] == sum(p.numel() for n, p in lm.named_parameters() if "norm" in n)
    assert 0 < lora["n_trainable"] < full["n_trainable"] == full["n_params"]
    for p in (norms, lora):  # frozen tensors: no gradient, no AdamW moments
        assert p["breakdown"]["sharded_params"] == full["breakdown"]["sharded_params"]
        assert p["per_rank_bytes"] < full["per_rank_bytes"]


def test_plan_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--plan", "--mfu", "1.5"])
    assert "--plan needs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_solver.parse_args([])  # without --plan, --data_config stays required
    assert "--data_config is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_solver.parse_args(["--plan", "--init_from", "/no/such/dir"])
    assert "--init_from /no/such/dir: no such directory" in capsys.readouterr().err


def _dry(script: str, env: dict) -> list[str]:
    res = run(["bash", f"exps/{script}"], timeout=30, env={"DRY_RUN": "1", "PLAN": "1", **env})
    return shlex.split(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["7B.sh", "34B.sh"])
def test_exps_plan_uses_the_scripts_settings_and_the_cluster_shape(script, monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "DATA_CONFIG", "NNODES", "NPROC_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    argv = _dry(script, {"NNODES": "4", "NPROC_PER_NODE": "8", "GPU_MEMORY_GB": "40", "GPU": "A100"})
    assert argv[1] == "finetune_solver.py"
    a = finetune_solver.parse_args(argv[2:])  # no --data_config needed for a plan
    size = script.removesuffix(".sh")
    assert (a.plan, a.world_size, a.gpu_memory_gb, a.gpu, a.model_size) == (True, 32, 40.0, "A100", size)
    assert (a.batch_size, a.accum_iter, a.max_seq_len, a.checkpointing, a.precision, a.dropout) == \
        (8, 1, 4096, True, "bf16", 0.05)
    assert finetune_solver.parse_args(_dry(script, {"SLURM_NTASKS": "16"})[2:]).world_size == 16
    assert finetune_solver.parse_args(_dry(script, {})[2:]).world_size == 8  # one 8-GPU node by default
    assert "--json" in _dry(script, {"PLAN_JSON": "1"})
    # without PLAN the script still insists on DATA_CONFIG
    res = subprocess.run(["bash", f"exps/{script}"], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"})
    assert res.returncode != 0 and "DATA_CONFIG" in res.stderr


@pytest.mark.slow
def test_exps_7B_plan_prints_in_seconds_on_this_cpu():
    res = run(["bash", "exps/7B.sh"], timeout=300, env={"PLAN": "1", "PLAN_JSON": "1", "PYTHON": sys.executable})
    p = json.loads(res.stdout.strip().splitlines()[-1])
    assert p["n_params"] == 7_013_666_816 and p["settings"]["world_size"] == 8 and isinstance(p["fits"], bool)

"""Checkpoint bookkeeping (model/training/checkpointing.py), the tiny model maker and Lumina's starting point."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model.training import checkpointing as ck
from model.chameleon_lm import image_token_ids, load_hf_config, zero_image_head
from model.make_tiny_model import make_tiny_model


def _fake_ckpt(out, name, complete=True):
    d = out / name
    d.mkdir(parents=True)
    (d / "x").write_text("data")
    if complete:
        (d / ck.MARKER).write_text("done")
    return d


def test_checkpoints_sort_by_epoch_then_iteration_with_epoch_end_last():
    names = ["epoch1", "epoch0-iter10", "epoch1-iter2", "epoch0", "epoch0-iter9", "epoch10-iter1"]
    assert sorted(names, key=ck.sort_key) == ["epoch0-iter9", "epoch0-iter10", "epoch0", "epoch1-iter2", "epoch1",
                                              "epoch10-iter1"]
    with pytest.raises(ValueError):
        ck.sort_key(".tmp-epoch0")


def test_latest_checkpoint_ignores_incomplete_and_temporary_dirs(tmp_path):
    _fake_ckpt(tmp_path, "epoch0-iter4")
    _fake_ckpt(tmp_path, "epoch0-iter8", complete=False)   # crashed before its marker
    _fake_ckpt(tmp_path, ".tmp-epoch0-iter12")             # crashed mid-save
    _fake_ckpt(tmp_path, "starting_point")
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "epoch0-iter4"
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.read_train_state(tmp_path / "epoch0-iter8")
    ck.remove_stale_tmp(tmp_path)
    assert not (tmp_path / ".tmp-epoch0-iter12").exists()
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for n in ["epoch0-iter2", "epoch0-iter4", "epoch0", "epoch1-iter2"]:
        _fake_ckpt(tmp_path, n)
    assert ck.prune_checkpoints(tmp_path, 0) == []
    ck.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["epoch0", "epoch1-iter2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0", "epoch1-iter2"]


def test_rng_state_round_trips_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    (tmp_path / "rng").mkdir()
    torch.save(ck.capture_rng(), tmp_path / "rng" / "rank00000.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.restore_rng(ck.load_rng(tmp_path, 0))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])
    assert ck.load_rng(tmp_path, 1) is None


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle, tmp_path_factory):
    return make_tiny_model(tiny_bundle, tmp_path_factory.mktemp("tiny_model"), seed=0)


def test_tiny_model_fits_the_bundle_and_is_deterministic(tiny_bundle, tiny_model, tiny_tokenizer, tmp_path):
    cfg = load_hf_config(tiny_model)
    assert cfg.vocab_size == tiny_tokenizer.vocab_size
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id,
                                                                       tiny_tokenizer.pad_id)
    assert cfg.vocabulary_map["<image>"] == tiny_tokenizer.vocab["<reserved08707>"]
    assert image_token_ids(cfg).tolist() == tiny_tokenizer.image_token_ids
    again = make_tiny_model(tiny_bundle, tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (tiny_model / "config.json").read_text()


def test_tiny_model_loads_in_transformers_with_the_bundle_vqgan(tiny_model, tiny_tokenizer):
    from transformers import ChameleonForConditionalGeneration

    hf = ChameleonForConditionalGeneration.from_pretrained(tiny_model).eval()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes_hf = hf.model.vqmodel.encode(pixels).image_tokens.reshape(-1)
    assert torch.equal(codes_hf.cpu(), tiny_tokenizer.encode_images(pixels).reshape(-1).cpu())


def test_zero_image_head_zeroes_exactly_the_image_rows(tiny_model, tmp_path):
    out = zero_image_head(tiny_model, tmp_path / "start")
    ids = image_token_ids(load_hf_config(out))
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            if k == "lm_head.weight":
                assert torch.count_nonzero(y[ids]) == 0
                keep = torch.ones(x.shape[0], dtype=torch.bool)
                keep[ids] = False
                assert torch.equal(x[keep], y[keep]) and torch.count_nonzero(x[ids]) > 0
            else:
                assert torch.equal(x, y), k
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_model / "config.json").read_text())


# ------------------------------------------------------------------------------- a crash at each step of a save

# Saves checkpoint NAME of a tiny model (weights 1.0), then, in a copy of that directory per crash point, saves the
# same NAME again (weights 2.0, as a run restarted from an older checkpoint does) in a forked child that
# os._exit()s at that step of the save (or finishes, for "none"). One interpreter start for all the points.
_CRASH_SAVE = r"""
import os, shutil, sys, warnings
import torch
from model.training import checkpointing as ck

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
root, steps = sys.argv[1], sys.argv[2:]
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def save(out, v):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(v)
    ck.save_checkpoint(out, "epoch0-iter2", model=model, optimizer=opt, args={}, hf_config={}, max_keep=0,
                       train_state={"v": v, "epoch": 0, "iter": 2, "global_step": 2})


save(os.path.join(root, "first"), 1.0)
for step in steps:
    out = os.path.join(root, step)
    shutil.copytree(os.path.join(root, "first"), out)
    pid = os.fork()
    if pid == 0:
        ck._on_save_step = lambda s: os._exit(17) if s == step else None
        save(out, 2.0)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(step, os.waitstatus_to_exitcode(status))
"""


def test_a_crash_at_any_step_of_saving_a_name_again_keeps_a_complete_copy_of_it(tmp_path):
    import subprocess
    import sys

    points = [*ck.SAVE_STEPS, "none"]
    run = subprocess.run([sys.executable, "-c", _CRASH_SAVE, str(tmp_path), *points], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    codes = dict(line.split() for line in run.stdout.split("\n") if line)
    assert codes == {p: "0" if p == "none" else "17" for p in points}, (codes, run.stderr[-3000:])
    for point in points:
        out = tmp_path / point
        ck.remove_stale_tmp(out)  # what the next run does first
        assert sorted(p.name for p in out.iterdir()) == ["epoch0-iter2"], point
        got = ck.latest_usable_checkpoint(out)
        assert got == out / "epoch0-iter2", point
        v = ck.read_train_state(got)["v"]
        # before the old copy moved aside the previous save stands; from then on the new one is complete
        assert v == (1.0 if point in ("tmp_created", "shards_written", "marker_written") else 2.0), point
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ck.load_checkpoint(got, model=model, optimizer=opt)
        assert all(torch.equal(p, torch.full_like(p, v)) for p in model.parameters()), point


def test_the_metadata_bytes_checked_are_the_bytes_loaded(tmp_path, monkeypatch):
    """A .metadata that changes between the check and DCP's load (a concurrent copy, or an attacker racing the
    check) must never be unpickled unchecked: the load reads and checks the file once."""
    import os
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    ckpt = tmp_path / "c"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": {"w": torch.ones(3)}}, checkpoint_id=str(ckpt))
    real_load = ck._DcpMetadataUnpickler.load
    loads = []

    def load_then_swap(self):
        out = real_load(self)  # the check sees the good file ...
        loads.append(1)
        if len(loads) == 1:  # ... and right after it, the file is replaced
            (ckpt / ".metadata").write_bytes(pickle.dumps(Payload()))
        return out

    monkeypatch.setattr(ck._DcpMetadataUnpickler, "load", load_then_swap)
    state = {"model": {"w": torch.zeros(3)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            ck.load_dcp_state(state, ckpt)
            error = None
        except ck.CheckpointError as e:
            error = e
    assert not marker.exists(), "DCP unpickled .metadata bytes that were never checked"
    if error is not None:  # the swapped file was checked and refused, or ...
        assert isinstance(error, ck.UnsafeCheckpointError) and "posix.system" in str(error), error
    else:  # ... the load used the bytes that were checked
        assert torch.equal(state["model"]["w"], torch.ones(3))


# ------------------------------------------------------------------------------- the VQ model of HF exports


def _vq_tensors(hf_dir) -> dict:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys() if ".vqmodel." in k})
    return out


@pytest.fixture(scope="module")
def run_from_a_release_without_vq(tiny_bundle, tiny_model, tmp_path_factory) -> dict:
    """One training step from an --init_from that, like Lumina's 7B releases, holds no VQ model."""
    import shutil

    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    import finetune_solver
    from dist_helper import make_learnable_data

    root = tmp_path_factory.mktemp("no_vq_run")
    release = root / "release"
    release.mkdir()
    shutil.copy(tiny_model / "config.json", release / "config.json")
    sd = load_file(str(tiny_model / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if ".vqmodel." not in k}, str(release / "model.safetensors"),
              metadata={"format": "pt"})
    data = make_learnable_data(root / "data", n_items=8)
    out = root / "out"
    assert finetune_solver.main(["--init_from", str(release), "--data_config", str(data), "--output_dir", str(out),
                                 "--precision", "fp32", "--num_workers", "0", "--batch_size", "2", "--accum_iter",
                                 "1", "--no_export_hf", "--save_iteration_interval", "1", "--max_steps", "1"]) == 0
    assert not dist.is_initialized()
    return {"release": release, "ckpt": out / "epoch0-iter1"}


@pytest.mark.slow
def test_an_export_never_holds_a_vq_model_nobody_trained_or_loaded(run_from_a_release_without_vq, tiny_model,
                                                                   tmp_path, caplog):
    from transformers import ChameleonForConditionalGeneration

    from model.export_hf import main as export_main

    ckpt, release = run_from_a_release_without_vq["ckpt"], run_from_a_release_without_vq["release"]
    with caplog.at_level("INFO"):
        assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "plain")]) == 0
    # --init_from has no VQ model: neither has the export (old code wrote a randomly initialised one) ...
    assert _vq_tensors(tmp_path / "plain") == {}
    assert "no VQ model" in caplog.text
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "plain").eval()  # ... and it still loads
    ids = torch.arange(9000, 9012).reshape(1, -1)
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=ids, use_cache=False).logits).all()
    # --vq_from copies the real one, bit for bit
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "with_vq"), "--vq_from", str(tiny_model)]) == 0
    want, got = _vq_tensors(tiny_model), _vq_tensors(tmp_path / "with_vq")
    assert want and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a --vq_from without one is an error, not an export without it
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bad"), "--vq_from", str(release)]) == 1
    assert "holds no VQ model" in caplog.text and not (tmp_path / "bad").exists()

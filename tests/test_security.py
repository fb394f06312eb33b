"""Security: no file from someone else's cluster runs code here. Each payload, if it ran, would create a
marker file (``os.system("touch ...")`` through a pickled callable, or a YAML python tag); every test
checks that the file is refused with a clear error AND that the marker does not exist.

Refused: a vqgan.ckpt, a pytorch_model.bin (--init_from), a DCP checkpoint's .metadata, a non-tensor DCP
entry, an rng/rank*.pt, a Lumina .pkl item, YAML tags in a data config and in vqgan.yaml.

Covered elsewhere: the restricted Lumina unpickler (tests/test_records.py::test_malicious_pickle_is_refused_
without_running_it, test_numpy_arrays_in_a_pickle_are_refused_too; tests/test_dataset.py::test_unsafe_pickle_
is_refused_naming_the_item; tests/test_inspect_record.py::test_a_malicious_pickle_is_refused_with_a_clear_
error_and_not_run), a vqgan.ckpt holding a non-tensor object (tests/test_tokenizer_bundle.py::test_checkpoint_
needing_arbitrary_code_is_refused), a !!python/object tag in a data config (tests/test_data_config.py::test_
python_object_tag_is_refused).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import finetune_solver
from data.data_config import DataConfigError, DataSource, load_data_config
from data.dataset import RecordDataset
from data.records import RecordFormatError
from dist_helper import make_learnable_data
from model.training import checkpointing as ck
from model.chameleon_lm import ModelLoadError, load_hf_config, read_hf_weights
from model.make_tiny_model import make_tiny_model
from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.vqgan import BundleError, VQGANConfig
from pre_tokenize.pre_tokenize import main as pretok_main


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the payload ran"


def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -------------------------------------------------------------------------------------- tokenizer bundle


def test_vqgan_ckpt_with_a_pickled_callable_is_refused_and_not_run(tiny_bundle, tmp_path, marker, caplog):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    sd = torch.load(bundle / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "callbacks": Payload(marker)}, bundle / "vqgan.ckpt")
    with pytest.raises(BundleError, match=r"vqgan.ckpt: cannot be read as a torch checkpoint with weights_only=True"):
        ChameleonTokenizer.from_bundle(bundle)
    # the same through pre_tokenize.py: a clear error, exit 2
    (tmp_path / "in.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                                     {"from": "gpt", "value": "a"}]}) + "\n")
    assert pretok_main(["--in_filename", str(tmp_path / "in.jsonl"), "--out_dir", str(tmp_path / "out"),
                        "--tokenizer_dir", str(bundle), "--no_progress", "--num_workers", "0"]) == 2
    assert "weights_only=True" in caplog.text and str(bundle / "vqgan.ckpt") in caplog.text


def test_vqgan_yaml_with_a_python_tag_is_refused_and_not_run(tiny_bundle, tmp_path, marker):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    text = (bundle / "vqgan.yaml").read_text()
    (bundle / "vqgan.yaml").write_text(text + f"hook: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(BundleError, match="vqgan.yaml: not valid YAML"):
        VQGANConfig.from_yaml(bundle / "vqgan.yaml")


# ------------------------------------------------------------------------------------------- data side


def test_data_config_yaml_tags_that_run_code_are_refused_and_not_run(tmp_path, marker):
    data = make_learnable_data(tmp_path / "data", n_items=8)
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']",
                f"!!python/object/new:os.system ['touch {marker}']",
                "!!python/name:os.system",
                "!!python/module:os"):
        data.write_text(f"META:\n  - path: record.json\n    type: {tag}\n")
        with pytest.raises(DataConfigError, match="refused a YAML tag") as e:
            load_data_config(data)
        assert str(data) in str(e.value)


def test_lumina_pickle_item_with_a_callable_is_refused_by_the_training_dataset_and_not_run(tmp_path, marker):
    (tmp_path / "0.pkl").write_bytes(pickle.dumps({"token": [1, 2, 3], "label": [1, 2, Payload(marker)]}))
    (tmp_path / "record.json").write_text(json.dumps([{"id": 0, "file": str(tmp_path / "0.pkl"), "len": 3}]))
    ds = RecordDataset([DataSource(tmp_path / "record.json")], max_seq_len=8)
    with pytest.raises(RecordFormatError, match=r"item id 0 .*0\.pkl.*refused to load posix.system"):
        ds[0]


# ---------------------------------------------------------------------------------------- model weights


def test_init_from_pytorch_model_bin_with_a_callable_is_refused_and_not_run(tiny_bundle, tmp_path, marker):
    model = make_tiny_model(tiny_bundle, tmp_path / "model", seed=0)
    from safetensors.torch import load_file

    sd = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save({**sd, "extra": Payload(marker)}, model / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin: .*weights_only=True"):
        read_hf_weights(model, load_hf_config(model))


# ------------------------------------------------------------------------------------ training checkpoints


@pytest.fixture(scope="module")
def trained(tiny_bundle, tmp_path_factory) -> dict:
    """A real training checkpoint after one step (one rank, in this process)."""
    root = tmp_path_factory.mktemp("security_run")
    assets = {"model": make_tiny_model(tiny_bundle, root / "model", seed=0),
              "data": make_learnable_data(root / "data", n_items=8)}
    out = root / "out"
    assert finetune_solver.main(solver_flags(assets, out, "--max_steps", "1")) == 0
    assert not dist.is_initialized()
    return {**assets, "ckpt": out / "epoch0-iter1"}


def solver_flags(assets: dict, out: Path, *extra: str) -> list[str]:
    return ["--init_from", str(assets["model"]), "--data_config", str(assets["data"]), "--output_dir", str(out),
            "--precision", "fp32", "--num_workers", "0", "--batch_size", "2", "--accum_iter", "1", "--no_export_hf",
            "--save_iteration_interval", "1", *extra]


def _poisoned_copy(trained: dict, tmp_path: Path, poison) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / trained["ckpt"].name
    shutil.copytree(trained["ckpt"], ckpt)
    poison(ckpt)
    return ckpt


POISONS = {
    "DCP .metadata": lambda ckpt, m: (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(m))),
    "rng/rank00000.pt": lambda ckpt, m: torch.save({"python": Payload(m)}, ckpt / "rng" / "rank00000.pt"),
}


@pytest.mark.parametrize("what", list(POISONS))
def test_training_checkpoint_with_code_is_refused_on_resume_and_not_run(trained, tmp_path, marker, what):
    ckpt = _poisoned_copy(trained, tmp_path, lambda c: POISONS[what](c, marker))
    with pytest.raises(ck.UnsafeCheckpointError, match="refused"):
        ck.verify_checkpoint(ckpt)
    with pytest.raises(ck.UnsafeCheckpointError):  # never skipped as "damaged": someone put it there
        ck.latest_usable_checkpoint(ckpt.parent)
    code = finetune_solver.main(solver_flags(trained, ckpt.parent, "--resume_path", str(ckpt), "--max_steps", "2"))
    assert not dist.is_initialized()
    log = (ckpt.parent / "common.log").read_text()
    assert code == 1 and "refused" in log, log[-3000:]


def test_trainer_given_a_data_config_with_a_python_tag_stops_with_a_clear_error_and_does_not_run_it(
        trained, tmp_path, marker):
    bad = tmp_path / "data.yaml"
    bad.write_text(f"META:\n  - path: !!python/object/apply:os.system ['touch {marker}']\n")
    code = finetune_solver.main(solver_flags({**trained, "data": bad}, tmp_path / "out", "--max_steps", "1"))
    assert not dist.is_initialized()
    log = (tmp_path / "out" / "common.log").read_text()
    assert code == 1 and f"data config {bad}: refused a YAML tag" in log, log[-3000:]


def test_export_of_a_checkpoint_whose_metadata_has_code_is_refused_and_not_run(trained, tmp_path, marker, caplog):
    from model.export_hf import main as export_main

    ckpt = _poisoned_copy(trained, tmp_path, lambda c: POISONS["DCP .metadata"](c, marker))
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 1
    assert "refused" in caplog.text and "posix.system" in caplog.text
    assert not (tmp_path / "hf").exists()


def test_a_dcp_entry_holding_a_pickled_callable_is_refused_and_not_run(tmp_path, marker):
    """DCP stores non-tensor values (optimizer hyper-parameters...) as pickles and loads them with
    weights_only=False; ours checks them with weights_only=True first."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": {"w": torch.ones(3)}, "optim": {"lr": Payload(marker)}}, checkpoint_id=str(tmp_path / "c"))
        assert not marker.exists()  # saving pickles the payload without running it
        state = {"model": {"w": torch.zeros(3)}, "optim": {"lr": 0.0}}
        with pytest.raises(ck.UnsafeCheckpointError, match=r"'optim.lr'.*refused"):
            ck.load_dcp_state(state, tmp_path / "c")
        ck.read_dcp_metadata(tmp_path / "c")  # the metadata itself is plain

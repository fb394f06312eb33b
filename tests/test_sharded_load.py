"""Sharded loading of safetensors starting weights (model/sharded_load.py) against the rank-0 path.

At 1 and 2 gloo ranks, for a plain HF checkpoint, an index-sharded one and a Lumina-layout one (bf16,
[model_parallel_size, head_dim] q/k norms, swin norm), the model filled by slices holds exactly the weights
of the rank-0 path (finetune_solver._load_initial_weights) and gives the same loss; a checkpoint that lacks a
weight or has a wrong shape stops every rank with a ModelLoadError instead of hanging one. Each rank reads
from the files exactly the bytes of its own shards (plus the tiny q/k norms it converts): counted at
safetensors, so a loader that read whole tensors on every rank fails at 2 ranks.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.make_tiny_model import make_tiny_model
from tests.dist_helper import free_port, spawn

LUMINA_MP = 2  # Lumina's model_parallel_size of the Lumina-layout checkpoint: 2 norm affines for 4 heads


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def write_hf_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor], n_files: int = 1) -> Path:
    """An HF dir: config.json and ``tensors`` in one model.safetensors or ``n_files`` index-listed shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if n_files == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i in range(n_files):
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::n_files]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded_load")
    plain = make_tiny_model(tiny_bundle, root / "plain", num_layers=2, seed=3)
    config = json.loads((plain / "config.json").read_text())
    tensors = _tensors(plain)
    sharded = write_hf_dir(root / "sharded", config, tensors, n_files=3)
    # Lumina's release layout: bf16, no VQ model, one q/k norm affine per model-parallel shard, swin norm
    g = torch.Generator().manual_seed(0)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    lumina = {k: v.bfloat16() for k, v in tensors.items() if ".vqmodel." not in k}
    for k in lumina:
        if ".q_norm." in k or ".k_norm." in k:
            lumina[k] = torch.randn(LUMINA_MP, head_dim, generator=g).bfloat16()
    lumina_dir = write_hf_dir(root / "lumina", {**config, "model_parallel_size": LUMINA_MP, "swin_norm": True,
                                                "torch_dtype": "bfloat16"}, lumina, n_files=2)
    broken = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"}
    missing = write_hf_dir(root / "missing", config, broken)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 5)
    bad_shape = write_hf_dir(root / "bad_shape", config, bad, n_files=2)
    return {"plain": plain, "sharded": sharded, "lumina": lumina_dir, "missing": missing, "bad_shape": bad_shape}


class _CountingSafeOpen:
    """``safetensors.safe_open`` that adds the bytes of every tensor it hands out (whole or sliced) to
    ``counts[key]``; headers (shapes, dtypes) cost nothing."""

    def __init__(self, real, counts: dict[str, int]):
        self.real, self.counts = real, counts

    def __call__(self, *args, **kw):
        counts, handle = self.counts, self.real(*args, **kw)

        class Slice:
            def __init__(self, key, sl):
                self.key, self.sl = key, sl

            def __getitem__(self, index):
                t = self.sl[index]
                counts[self.key] = counts.get(self.key, 0) + t.numel() * t.element_size()
                return t

            def __getattr__(self, name):
                return getattr(self.sl, name)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, key):
                t = handle.get_tensor(key)
                counts[key] = counts.get(key, 0) + t.numel() * t.element_size()
                return t

            def get_slice(self, key):
                return Slice(key, handle.get_slice(key))

            def __getattr__(self, name):
                return getattr(handle, name)

        return Handle()


def _bytes_read_by_slices(lm, model_dir: Path) -> dict[str, int]:
    """Loads ``model_dir`` into ``lm`` by slices, counting the tensor bytes this rank reads per key."""
    import safetensors
    import safetensors.torch

    from model.sharded_load import load_sharded_safetensors

    counts: dict[str, int] = {}
    real = safetensors.safe_open
    safetensors.safe_open = safetensors.torch.safe_open = _CountingSafeOpen(real, counts)
    try:
        load_sharded_safetensors(lm, model_dir)
    finally:
        safetensors.safe_open = safetensors.torch.safe_open = real
    return counts


def _sharded_model(model_dir: Path, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    from model.chameleon_lm import build_chameleon_lm, load_hf_config
    from model.training.parallelize import parallelize

    lm = build_chameleon_lm(load_hf_config(model_dir), device="meta", mask_image_logits=True)
    parallelize(lm, init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)), precision="fp32")
    lm.to_empty(device="cpu")
    lm.reset_nonpersistent_buffers("cpu")
    return lm


def _check_bytes_read(read: dict[str, int], lm, stored: dict[str, torch.Tensor], name: str, world: int) -> None:
    """This rank read its own shard of each tensor, in the file's dtype, and the q/k norms of another grouping
    (Lumina's [model_parallel_size, head_dim], converted on every rank) whole; nothing else."""
    from torch.distributed.tensor import DTensor

    from model.qk_norm import NORM_KEY_RE

    want = {}
    for k, p in lm.state_dict().items():
        local = p.to_local() if isinstance(p, DTensor) else p
        file_t = stored[k]
        whole = tuple(file_t.shape) != tuple(p.shape) and NORM_KEY_RE.match(k) is not None
        want[k] = file_t.numel() * file_t.element_size() if whole else local.numel() * file_t.element_size()
    want = {k: v for k, v in want.items() if v}
    assert read == want, f"{name}: bytes read per tensor differ from this rank's shards: " \
                         f"{ {k: (read.get(k), want.get(k)) for k in set(read) | set(want) if read.get(k) != want.get(k)} }"
    model_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if ".vqmodel." not in k)
    if world == 2:  # a per-rank bound readable at a glance: about half the model, never all of it
        assert sum(read.values()) < 0.6 * model_bytes, (name, sum(read.values()), model_bytes)


def _worker(rank: int, world: int, dirs: dict[str, str]) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import finetune_solver
    from model.chameleon_lm import ModelLoadError, read_hf_weights
    from model.training.distributed import cleanup_distributed, detect_launch_env, init_distributed
    from model.sharded_load import load_sharded_safetensors, sharded_loading_applies

    torch.set_num_threads(1)
    init_distributed(detect_launch_env(), timeout_s=60)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ids = torch.tensor([[0, 9100, 9105, 4, 5, 6, 9120, 9101, 9130, 9140]])
    labels = ids.clone()
    try:
        for name in ("plain", "sharded", "lumina"):
            d = Path(dirs[name])
            assert sharded_loading_applies(d)
            by_rank0 = _sharded_model(d, world)
            finetune_solver._load_initial_weights(by_rank0, str(d), rank)
            by_slices = _sharded_model(d, world)
            read = _bytes_read_by_slices(by_slices, d)
            _check_bytes_read(read, by_slices, _tensors(d), name, world)
            a = get_model_state_dict(by_rank0, options=full)
            b = get_model_state_dict(by_slices, options=full)
            if rank == 0:
                stored = read_hf_weights(d, by_slices.config)
                assert a.keys() == b.keys()
                for k in a:
                    assert b[k].dtype == torch.float32, k
                    assert torch.equal(a[k], b[k]), f"{name}: {k} differs from the rank-0 path"
                    assert torch.equal(b[k], stored[k].float()), f"{name}: {k} differs from the checkpoint"
            with torch.no_grad():
                la, lb = by_rank0(ids, labels).loss, by_slices(ids, labels).loss
            assert torch.isfinite(lb) and torch.equal(la, lb), f"{name}: loss {lb} vs rank-0 path {la}"
        for name, words in (("missing", "lacks 1 weights"), ("bad_shape", "o_proj.weight has shape [3, 5]")):
            lm = _sharded_model(Path(dirs[name]), world)
            try:
                load_sharded_safetensors(lm, dirs[name])
            except ModelLoadError as e:
                assert words in str(e), str(e)
            else:
                raise AssertionError(f"{name}: no ModelLoadError")
        dist.barrier()  # every rank got its error and is still in step with the others
    finally:
        cleanup_distributed()


@pytest.mark.parametrize("world", [1, 2])
def test_loading_by_slices_gives_the_weights_and_loss_of_the_rank0_path(checkpoints, world):
    port = str(free_port())
    spawn(functools.partial(_worker, world=world, dirs={k: str(v) for k, v in checkpoints.items()}), world,
          timeout=240, env_for_rank=lambda r: {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})


def test_bin_checkpoints_keep_the_rank0_path(checkpoints, tmp_path):
    from model.sharded_load import sharded_loading_applies

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(checkpoints["plain"] / "config.json", d)
    torch.save(_tensors(checkpoints["plain"]), d / "pytorch_model.bin")
    assert not sharded_loading_applies(d)
    assert sharded_loading_applies(checkpoints["sharded"])

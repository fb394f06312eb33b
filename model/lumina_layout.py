"""Lumina-mGPT's weight layout: the q/k-norm grouping a run keeps, and exports Lumina's tools open.

    python model/export_hf.py --ckpt output/7B/epoch0 --out lumina_dir --layout lumina --dtype bf16
    python finetune_solver.py ... --export_layout both        # epoch{E}/hf/ and epoch{E}/lumina/

Two layouts of the same model (DESIGN.md, "Model weight layouts"):

- transformers' (``save_hf`` in model/training/checkpointing.py): q/k norms ``[heads, head_dim]``, one affine per
  head (a grouped run's rows repeated over the heads of each group), VQ model included; loads with
  ``ChameleonForConditionalGeneration.from_pretrained``.
- Lumina-mGPT's (``save_lumina`` here), what its ``ChameleonXLLMXForConditionalGeneration.save_pretrained``
  writes: q/k norms ``[model_parallel_size, head_dim]``; ``config.json`` with its keys
  (``model_parallel_size``, ``swin_norm``, ``mask_image_logits``, ``dropout``, ``z_loss_weight``,
  ``architectures``, ``rope_theta`` / ``rope_scaling``, ``torch_dtype``); sharded safetensors
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``; no ``model.vqmodel.*``
  (Lumina's releases have none: its tools tokenize images with the separate VQGAN).

A run's grouping (``choose_qk_norm_groups``) is decided once, on rank 0, before the model is built on the
meta device, and recorded as ``config.qk_norm_groups`` in every checkpoint's config.json: a resumed run
takes it from the checkpoint, exports and generation rebuild the same shapes from it. The Lumina export is
exact: the trained [G, head_dim] rows are repeated to model_parallel_size rows when G divides it; a run
whose norms are per head and differ has no Lumina form and is refused (``LuminaLayoutError``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from model.chameleon_lm import ModelLoadError, read_qk_norms
from model.qk_norm import (QK_NORM_GROUPS, QKNormLayoutError, decide_groups, head_counts, qk_norm_groups,
                           regroup_state_dict)

logger = logging.getLogger(__name__)

ARCHITECTURE = "ChameleonXLLMXForConditionalGeneration"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB") in Lumina's versions
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
LAYOUTS = ("hf", "lumina", "both")


class LuminaLayoutError(ValueError):
    """A model that Lumina-mGPT's layout cannot hold without changing it (per-head q/k norms that differ)."""


def choose_qk_norm_groups(model_dir: str | Path, config, resume: str | Path | None = None) -> int | None:
    """The q/k-norm grouping of a run (see model/qk_norm.py), logged: from the checkpoint resumed from (its
    DCP shards hold those shapes; a checkpoint without the key predates grouping: per head), else from the
    stored norms of ``model_dir``. ModelLoadError when the norms fit no layout."""
    if resume is not None:
        path = Path(resume) / "config.json"
        try:
            groups = json.loads(path.read_text()).get(QK_NORM_GROUPS)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: cannot read the checkpoint's model config ({e})") from e
        why = f"as recorded in {path}"
    else:
        try:
            groups, why = decide_groups(read_qk_norms(Path(model_dir)), config)
        except QKNormLayoutError as e:
            raise ModelLoadError(f"{model_dir}: {e}") from e
    if groups is None:
        logger.info("q/k-norm layout: per head (%d q / %d k heads, independent affines; %s)",
                    *head_counts(config).values(), why)
    else:
        logger.info("q/k-norm layout: %d group(s) of heads, parameters [%d, head_dim] (%s)", groups, groups, why)
    return groups


def lumina_rows(config) -> int:
    """The model_parallel_size a Lumina export of this model writes: the config's model_parallel_size when
    the run's groups divide it (each group's row repeated over its shards), else the groups themselves."""
    g = qk_norm_groups(config)
    mp = int(getattr(config, "model_parallel_size", 1) or 1)
    fits = all(n % mp == 0 for n in head_counts(config).values()) and (g is None or mp % g == 0)
    return mp if fits or g is None else g


def _refusal(config, detail: str) -> str:
    heads = head_counts(config)
    return (f"Lumina-mGPT's layout cannot hold this model: its q/k norms are per head and differ between "
            f"heads ({heads['q_norm']} q / {heads['k_norm']} k heads; {detail}), while Lumina keeps one affine "
            f"per model-parallel shard (model_parallel_size {getattr(config, 'model_parallel_size', 1)}). "
            f"Export transformers' layout instead (--layout hf / --export_layout hf)")


def lumina_export_problem(config) -> str | None:
    """Why a run with this config will not export to Lumina's layout (None: it will). A run whose norms
    start per head and differing keeps them so, which is known before training starts."""
    if qk_norm_groups(config) is None:
        return _refusal(config, "the run trains them independently")
    return None


def lumina_config(config, *, model_parallel_size: int, dtype: torch.dtype, flags: dict | None = None) -> dict:
    """config.json as Lumina's ChameleonXLLMXConfig writes it (transformers 4.4x key names)."""
    d = json.loads(config.to_json_string())
    for k in (QK_NORM_GROUPS, "dtype", "torch_dtype", "image_token_id"):
        d.pop(k, None)
    rope = d.pop("rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    d["rope_theta"] = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "factor": float(rope["factor"])}
    flags = flags or {}
    d.update(architectures=[ARCHITECTURE], model_type="chameleon", model_parallel_size=model_parallel_size,
             swin_norm=bool(getattr(config, "swin_norm", False)), torch_dtype=DTYPE_NAMES[dtype],
             mask_image_logits=bool(flags.get("mask_image_logits", True)), dropout=float(flags.get("dropout", 0.0)),
             z_loss_weight=float(flags.get("z_loss_weight", 0.0)))
    return dict(sorted(d.items()))


def _write_sharded(sd: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """safetensors shards in ``sd``'s key order (a shard closes before it would pass ``max_shard_bytes``)
    and transformers' index {"metadata": {"total_size"}, "weight_map": {key: file}}; returns the files."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    for old in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_NAME]:
        old.unlink(missing_ok=True)  # a re-export must not leave shards of an earlier one to be read too
    names, weight_map = [], {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        names.append(name)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    return names


def save_lumina(full_sd: dict[str, torch.Tensor], config, out_dir: str | Path, *, dtype: torch.dtype,
                flags: dict | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes our weights (``full_sd``: the trained model's full state dict) in Lumina-mGPT's layout.
    ``flags``: the run's mask_image_logits / dropout / z_loss_weight, recorded in config.json as Lumina does.
    LuminaLayoutError (before anything is written) when the q/k norms have no exact Lumina form."""
    out_dir = Path(out_dir)
    mp = lumina_rows(config)
    try:
        sd = regroup_state_dict({k: v for k, v in full_sd.items() if ".vqmodel." not in k}, config, mp)
    except QKNormLayoutError as e:  # per-head norms (a config that records no grouping) that differ
        raise LuminaLayoutError(_refusal(config, str(e))) from e
    sd = {k: v.detach().to("cpu", dtype) for k, v in sd.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _write_sharded(sd, out_dir, max_shard_bytes)
    cfg = lumina_config(config, model_parallel_size=mp, dtype=dtype, flags=flags)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    logger.info("exported Lumina-mGPT layout to %s (%s, model_parallel_size %d, %d shard(s))", out_dir,
                DTYPE_NAMES[dtype], mp, len(files))
    return out_dir

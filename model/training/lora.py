r"""LoRA through the ``peft`` library: wrapping the model for training, its initial weights, and export.

    python finetune_solver.py ... --lora_rank 16 --lora_alpha 32 --lora_dropout 0.05 \
        --lora_targets q_proj,k_proj,v_proj,o_proj [--trainable image_head] [--only_save_trainable]

What this module owns:

- ``apply_lora(lm, a)``: ``peft.inject_adapter_in_model`` with a ``LoraConfig`` whose ``target_modules`` is
  a regex over the decoder layers only (``model.layers.N.self_attn|mlp.{targets}``; never lm_head, the
  embeddings or the VQ model). It runs on the meta-device model before ``parallelize`` (FSDP2 then shards
  the adapters with their layer), keeps our module names (``q_proj.base_layer.weight``,
  ``q_proj.lora_A.default.weight``), and freezes every non-adapter weight; model/training/trainable.py then adds what
  ``--trainable`` names besides the adapters. No LoRA layer is written here: the layers are peft's.
- ``hf_to_model_state``: the initial weights for the wrapped model: the --init_from tensors under the
  wrapped names, and the adapters initialised as peft does by default (``init_lora_weights=True``: A
  Kaiming-uniform with a=sqrt(5), B zero, so training starts from the base model), drawn from a generator
  seeded by (--seed, name): the same on any number of ranks.
- ``merged_hf_state``: at export (the epoch ``hf/`` export and model/export_hf.py), an HF
  ``ChameleonForConditionalGeneration`` is given the trained weights, wrapped with ``peft.get_peft_model``
  (modules that ``--trainable`` trained besides the adapters go to ``modules_to_save``), the adapter is
  written with ``save_pretrained`` into ``{hf}/adapter/`` (``adapter_model.safetensors`` +
  ``adapter_config.json``, base = the --init_from dir), and ``merge_and_unload`` gives the merged weights
  that ``{hf}/`` holds. The merged model's logits equal the LoRA model's up to float rounding
  (W + s*B@A vs W x + s*B(A x)); tests/test_lora.py checks both.

peft is an optional dependency, imported only when LoRA is asked for: ``pip install -e .[lora]``.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from pathlib import Path

import torch
from torch import nn

from model.qk_norm import regroup_state_dict

from model.training.trainable import clean_name, hf_name

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


class LoraError(RuntimeError):
    """LoRA asked for but impossible (peft missing); the message says what to do."""


def _peft():
    try:
        import peft
    except ImportError as e:
        raise LoraError(f"--lora_rank needs the peft library, which is not installed ({e}); install the extra: "
                        f"pip install -e .[lora]") from None
    return peft


def _arg(a, name: str, default=None):
    return a.get(name, default) if isinstance(a, dict) else getattr(a, name, default)


def parse_targets(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def flag_problems(a) -> list[str]:
    """Problems in the --lora_* flags, each naming its flag (for finetune_solver.validate_args)."""
    bad = []
    if a.lora_rank < 0:
        bad.append(f"--lora_rank must be >= 0 (0: no LoRA) (got {a.lora_rank})")
    if a.lora_rank > 0:
        if not a.lora_alpha > 0:
            bad.append(f"--lora_alpha must be > 0 (got {a.lora_alpha})")
        if not 0 <= a.lora_dropout < 1:
            bad.append(f"--lora_dropout must be in [0, 1) (got {a.lora_dropout})")
        ts = parse_targets(a.lora_targets)
        unknown = [t for t in ts if t not in LORA_TARGETS]
        if not ts or unknown:
            bad.append(f"--lora_targets {a.lora_targets!r}: choose from {','.join(LORA_TARGETS)} (the decoder "
                       f"layers' linear layers)")
    return bad


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str], **kw):
    peft = _peft()
    regex = rf"model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(map(re.escape, targets))})"
    return peft.LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=regex,
                           bias="none", init_lora_weights=True, **kw)


def apply_lora(lm: nn.Module, a) -> bool:
    """Wraps the targets of ``lm`` with peft's LoRA layers in place when ``a.lora_rank > 0`` (``a``: the
    trainer's flags, or the ``args.json`` dict of a checkpoint). Returns whether it did."""
    rank = int(_arg(a, "lora_rank", 0) or 0)
    if rank <= 0:
        return False
    cfg = lora_config(rank, float(_arg(a, "lora_alpha")), float(_arg(a, "lora_dropout")),
                      parse_targets(_arg(a, "lora_targets")))
    _peft().inject_adapter_in_model(cfg, lm)
    lm.lora_config = cfg
    lm.lora_seed = int(_arg(a, "seed", 0))
    n = sum(1 for m in lm.modules() if hasattr(m, "lora_A"))
    logger.info("LoRA (peft): rank %d, alpha %g, dropout %g on %d linear layers (%s)", rank, cfg.lora_alpha,
                cfg.lora_dropout, n, _arg(a, "lora_targets"))
    return True


def hf_to_model_state(lm: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-keyed initial weights -> the keys of ``lm`` (identity without LoRA), adapters initialised."""
    cfg = getattr(lm, "lora_config", None)
    if cfg is None:
        return full
    out = {}
    for k, v in lm.state_dict().items():
        if ".lora_A." in k:
            g = torch.Generator().manual_seed(lm.lora_seed * 1_000_003 + zlib.crc32(k.encode()))
            w = torch.empty(v.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)  # peft's LoraLayer.reset_lora_parameters
            out[k] = w
        elif ".lora_B." in k:
            out[k] = torch.zeros(v.shape, dtype=torch.float32)
        elif hf_name(k) in full:
            out[k] = full[hf_name(k)]
    return out


def extra_trained_modules(lm: nn.Module) -> list[str]:
    """Modules whose parameters train besides the adapters (peft's ``modules_to_save`` at export)."""
    plan = getattr(lm, "trainable_plan", None)
    names = set(plan.full) | set(plan.rows) if plan is not None else set()
    return sorted({hf_name(n).rsplit(".", 1)[0] for n in names if ".lora_" not in n})


def merged_hf_state(sd: dict[str, torch.Tensor], lm: nn.Module, adapter_dir: str | Path,
                    base: str | Path | None) -> dict[str, torch.Tensor]:
    """For a LoRA model: writes the peft adapter into ``adapter_dir`` and returns the merged HF-keyed weights
    (``sd``: the full state dict of ``lm``, CPU; it is consumed: the merge updates its tensors in place).
    Without LoRA: ``sd`` unchanged."""
    cfg = getattr(lm, "lora_config", None)
    if cfg is None:
        return sd
    from transformers import ChameleonForConditionalGeneration

    peft = _peft()
    # transformers' model holds per-head q/k norms; ours may be grouped (model/qk_norm.py)
    sd = regroup_state_dict({clean_name(k): v.float() for k, v in sd.items()}, lm.config, None)
    with torch.device("meta"):
        hf = ChameleonForConditionalGeneration(lm.config)
    del hf.model.vqmodel  # not trained, not in the adapter; the merged export gets it back in save_hf
    # assign, not copy: a 7B model is not held twice; merge_and_unload then adds B@A into these tensors
    hf.load_state_dict({hf_name(k): v for k, v in sd.items() if ".lora_" not in k}, strict=True, assign=True)
    mods = extra_trained_modules(lm)
    pcfg = lora_config(cfg.r, cfg.lora_alpha, cfg.lora_dropout, [], modules_to_save=mods or None)
    pcfg.target_modules = cfg.target_modules
    hf.name_or_path = str(Path(base).resolve()) if base is not None else None  # peft takes the adapter's base from it
    pm = peft.get_peft_model(hf, pcfg)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if ".lora_" in k:
                params[f"base_model.model.{k}"].copy_(v)
            elif hf_name(k).rsplit(".", 1)[0] in mods:
                mod, leaf = hf_name(k).rsplit(".", 1)
                params[f"base_model.model.{mod}.modules_to_save.default.{leaf}"].copy_(v)
    pm.save_pretrained(str(adapter_dir), safe_serialization=True)
    merged = pm.merge_and_unload()
    logger.info("LoRA adapter written to %s (modules_to_save: %s); merged weights exported", adapter_dir,
                mods or "none")
    return {k: v.detach() for k, v in merged.state_dict().items()}

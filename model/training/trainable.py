"""Which parameters train (``--trainable``), row-level freezing, and checkpoints of the trainable part only.

What this module owns:

1. Resolving ``--trainable PATTERNS`` into a plan. PATTERNS is a comma-separated list; each entry is a
   preset or a glob over parameter names (``fnmatch``; a glob naming a module also matches its
   parameters: ``lm_head`` matches ``lm_head.weight``). The union of all entries trains.

       all         every parameter (the default without LoRA)
       image_head  only the image-code rows (ids 4..8195 in Chameleon's vocabulary; read from the config's
                   vocabulary map, as model/chameleon_lm.image_token_ids does) of lm_head.weight and of
                   model.embed_tokens.weight; everything else frozen (Anole's recipe)
       no_embed    everything except the input embeddings model.embed_tokens.weight
       norms       every norm weight and bias (RMSNorms, the per-head q/k LayerNorms, the final norm)
       GLOB        e.g. model.layers.*.self_attn.*, lm_head, model.layers.3.*

   With LoRA (model/training/lora.py) the adapters always train and PATTERNS names what trains *besides* them
   (default: nothing); the weights LoRA wraps (``*.base_layer.weight``) never train. Names are the HF
   names (``.base_layer`` and activation-checkpoint wrappers removed).

2. Freezing. A frozen parameter gets ``requires_grad=False`` before FSDP wraps the model: no gradient, no
   optimizer state, no reduce-scatter (FSDP2 shards mixed trainable/frozen units per parameter). A
   row-level parameter (``image_head``) keeps ``requires_grad=True`` and a row mask: ``mask_frozen_rows``
   (called after backward, before clipping) sets the gradient of its frozen rows to exactly 0, on the
   local shard of each rank (the mask is sharded like the parameter, through ``distribute_tensor``).
   AdamW with a zero gradient since the first step keeps zero moments for those rows and adds exactly 0
   to them, but its decoupled weight decay would still shrink them; such parameters therefore sit in a
   weight-decay-0 group and an optimizer pre-step hook applies ``p *= 1 - lr * wd`` to their trainable
   rows only (the same multiplication AdamW does). Frozen rows stay bitwise unchanged
   (tests/test_trainable.py checks it on 1 and 2 ranks).

3. ``--only_save_trainable`` (Lumina's flag): checkpoints hold the trainable tensors (whole tensors for
   row-level ones) and their optimizer state only (when nothing is frozen, simply everything), and
   ``trainer_state.json`` records ``"base_model": {"path": the --init_from dir, "fingerprint":
   base_fingerprint(dir)}``. Resume and model/export_hf.py
   load the base weights from --init_from first and the checkpoint on top, and refuse (CheckpointError)
   when the base is missing or its fingerprint differs. The fingerprint is a sha256 over the config, and
   per weight file its name, size, header and 64 evenly spaced 64-KiB samples of its bytes: it reads a
   few MB whatever the model size, and tells apart any two different trainings of a model (fine-tuning
   changes nearly every byte), though not a deliberate edit of one byte between the samples.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.chameleon_lm import image_token_ids, read_hf_weights
from model.training.checkpointing import CheckpointError

logger = logging.getLogger(__name__)

PRESETS = ("all", "image_head", "no_embed", "norms")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ROW_PARAMS = (HEAD, EMBED)  # the image_head preset's parameters (rows = image-code ids)
TRAINABLE_HELP = ("comma-separated parameter-name globs and presets that train; the rest is frozen (no "
                  "gradient, no optimizer state). Presets: all (every parameter; the default without LoRA), "
                  "image_head (only the image-code rows 4..8195 of lm_head and of the input embeddings), "
                  "no_embed (all but model.embed_tokens), norms (every norm weight/bias). Globs: e.g. "
                  "'model.layers.*.self_attn.*,lm_head'. With --lora_rank: what trains besides the adapters "
                  "(default: nothing). See model/training/trainable.py")
_WRAPPERS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")
FP_SAMPLES, FP_SAMPLE_BYTES = 64, 1 << 16


class TrainableError(ValueError):
    """--trainable names nothing or something impossible; the message names the entry."""


def clean_name(name: str) -> str:
    """The state-dict name of a parameter (without activation-checkpoint / compile wrappers)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def hf_name(name: str) -> str:
    """The name in an HF checkpoint (LoRA's ``.base_layer`` removed)."""
    return clean_name(name).replace(".base_layer.", ".")


def is_norm(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2]


@dataclass
class TrainablePlan:
    """Names (clean) of fully trainable parameters, and row masks (True = trains) of row-level ones."""

    full: set[str] = field(default_factory=set)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def trains(self, name: str) -> bool:
        return name in self.full or name in self.rows


def resolve(spec: str | None, params: dict[str, torch.Tensor], config, *, lora: bool = False) -> TrainablePlan:
    """The plan for ``spec`` over ``params`` (clean name -> tensor; meta tensors are fine)."""
    entries = [e.strip() for e in (spec or ("" if lora else "all")).split(",") if e.strip()]
    lora_names = {n for n in params if ".lora_" in n}
    base = {n for n in params if n not in lora_names and ".base_layer." not in n}  # what --trainable may pick
    plan = TrainablePlan(full=set(lora_names))
    for e in entries:
        if e == "all":
            hit = set(base)
        elif e == "no_embed":
            hit = base - {EMBED}
        elif e == "norms":
            hit = {n for n in base if is_norm(hf_name(n))}
        elif e == "image_head":
            ids = image_token_ids(config)
            if ids.numel() == 0:
                raise TrainableError("--trainable image_head: the model's vocabulary_map names no image codes "
                                     "(IMGIMG*)")
            for n in ROW_PARAMS:
                if n in base:
                    mask = torch.zeros(params[n].shape[0], dtype=torch.bool)
                    mask[ids] = True
                    plan.rows[n] = plan.rows[n] | mask if n in plan.rows else mask
            continue
        else:
            hit = {n for n in base if fnmatch.fnmatchcase(hf_name(n), e) or fnmatch.fnmatchcase(hf_name(n), e + ".*")}
            if not hit:
                wrapped = [n for n in params if ".base_layer." in n and fnmatch.fnmatchcase(hf_name(n), e)]
                why = (f"it matches only weights LoRA wraps ({wrapped[0]}...), which train through their adapters"
                       if wrapped else "names look like model.layers.0.self_attn.q_proj.weight, lm_head.weight, "
                                       "model.embed_tokens.weight")
                raise TrainableError(f"--trainable {e}: matches no parameter that can train; {why}")
        plan.full |= hit
    for n in list(plan.rows):
        if n in plan.full:  # a whole-tensor entry wins over the row-level preset
            del plan.rows[n]
    if not plan.full and not plan.rows:
        raise TrainableError(f"--trainable {spec!r}: nothing would train")
    return plan


def count(plan: TrainablePlan, params: dict[str, torch.Tensor]) -> int:
    n = sum(params[k].numel() for k in plan.full)
    for k, m in plan.rows.items():
        n += int(m.sum()) * (params[k].numel() // params[k].shape[0])
    return n


def apply_trainable(lm: nn.Module, spec: str | None, *, lora: bool = False) -> dict:
    """Sets ``requires_grad`` from ``spec`` (before ``parallelize``), keeps the row masks on ``lm`` and returns
    ``{"trainable_params", "total_params"}`` (also logged)."""
    params = {clean_name(n): p for n, p in lm.named_parameters()}
    plan = resolve(spec, params, lm.config, lora=lora)
    for n, p in params.items():
        p.requires_grad_(plan.trains(n))
    lm.trainable_plan = plan
    lm.frozen_row_masks = {}  # filled per rank by shard_row_masks
    n_train, n_all = count(plan, params), sum(p.numel() for p in params.values())
    frozen = sorted(n for n in params if not plan.trains(n))
    rows = ", ".join(f"{k}: {int(m.sum())} of {m.numel()} rows" for k, m in sorted(plan.rows.items()))
    logger.info("trainable: %d of %d parameters (%.2f%%)%s; %d tensors frozen%s", n_train, n_all,
                100 * n_train / max(n_all, 1), f"; row-level: {rows}" if rows else "", len(frozen),
                f" (e.g. {frozen[:2]})" if frozen else "")
    return {"trainable_params": n_train, "total_params": n_all}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def shard_row_masks(lm: nn.Module) -> None:
    """After ``parallelize`` and materialisation: each rank's slice of the frozen-row masks, sharded exactly as
    the parameter (FSDP2 shards dim 0 with torch.chunk; ``distribute_tensor`` applies the same placements)."""
    plan: TrainablePlan | None = getattr(lm, "trainable_plan", None)
    lm.frozen_row_masks = {}
    if plan is None:
        return
    params = {clean_name(n): p for n, p in lm.named_parameters()}
    for n, mask in plan.rows.items():
        p = params[n]
        frozen = ~mask
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            frozen = distribute_tensor(frozen, p.device_mesh, p.placements, src_data_rank=None).to_local()
        frozen = frozen.to(_local(p).device)
        if frozen.shape[0] != _local(p).shape[0]:
            raise RuntimeError(f"{n}: row mask of {frozen.shape[0]} rows for a local shard of {_local(p).shape[0]}")
        lm.frozen_row_masks[n] = frozen


def mask_frozen_rows(lm: nn.Module) -> None:
    """Zeroes the gradient of every frozen row (call after backward, before clipping). No-op without masks."""
    masks = getattr(lm, "frozen_row_masks", None)
    if not masks:
        return
    params = {clean_name(n): p for n, p in lm.named_parameters()}
    for n, frozen in masks.items():
        g = params[n].grad
        if g is not None:
            gl = _local(g)
            gl.masked_fill_(frozen.view(-1, *([1] * (gl.dim() - 1))), 0.0)


def attach_to_optimizer(optimizer: torch.optim.Optimizer, lm: nn.Module) -> torch.optim.Optimizer:
    """Moves row-level parameters out of weight-decayed groups and applies their decay to trainable rows only,
    in a pre-step hook (so AdamW's decoupled decay never touches a frozen row). Returns ``optimizer``."""
    masks = getattr(lm, "frozen_row_masks", None)
    if not masks:
        return optimizer
    by_id = {id(p): n for n, p in ((clean_name(n), p) for n, p in lm.named_parameters()) if n in masks}
    moved: list[tuple[torch.Tensor, str, float]] = []
    for g in optimizer.param_groups:
        if g.get("weight_decay", 0.0) > 0:
            keep = [p for p in g["params"] if id(p) not in by_id]
            moved += [(p, by_id[id(p)], g["weight_decay"]) for p in g["params"] if id(p) in by_id]
            g["params"] = keep
    for wd in sorted({w for _, _, w in moved}):
        optimizer.add_param_group({"params": [p for p, _, w in moved if w == wd], "weight_decay": 0.0,
                                   "row_weight_decay": wd})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not moved:
        return optimizer
    names = {id(p): n for p, n, _ in moved}

    @torch.no_grad()
    def decay_trainable_rows(opt, _args, _kwargs):
        for g in opt.param_groups:
            wd = g.get("row_weight_decay", 0.0)
            if not wd:
                continue
            for p in g["params"]:
                if p.grad is None:
                    continue
                local = _local(p)
                factor = torch.where(masks[names[id(p)]], 1.0, 1.0 - g["lr"] * wd).to(local.dtype)
                local.mul_(factor.view(-1, *([1] * (local.dim() - 1))))

    optimizer.register_step_pre_hook(decay_trainable_rows)
    return optimizer


# ------------------------------------------------------------------------------------------------------------
# --only_save_trainable


def saved_model_keys(lm: nn.Module, only_trainable: bool) -> set[str] | None:
    """State-dict keys a checkpoint holds: None (all) unless ``only_trainable`` and something is frozen."""
    if not only_trainable:
        return None
    keys = {clean_name(n) for n, p in lm.named_parameters() if p.requires_grad}
    return keys if len(keys) < len(list(lm.parameters())) else None


def load_base_weights(lm: nn.Module, base: str | Path) -> nn.Module:
    """Copies the HF weights of ``base`` into the (unsharded, CPU) ``lm``, under its own (e.g. LoRA) names."""
    full = read_hf_weights(Path(base), lm.config)
    with torch.no_grad():
        for k, v in lm.state_dict().items():
            if hf_name(k) in full:
                v.copy_(full[hf_name(k)])
    return lm


def base_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json (canonical) and per weight file: name, size, header, 64 sampled 64-KiB blocks."""
    d = Path(model_dir)
    h = hashlib.sha256()
    try:
        h.update(json.dumps(json.loads((d / "config.json").read_text()), sort_keys=True).encode())
        files = sorted(list(d.glob("*.safetensors")) + list(d.glob("pytorch_model*.bin")))
        if not files:
            raise OSError(f"{d}: no weight files")
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                if f.suffix == ".safetensors" and len(head) == 8:
                    head += fh.read(int.from_bytes(head, "little"))
                h.update(head)
                for i in range(FP_SAMPLES):
                    fh.seek(size * i // FP_SAMPLES)
                    h.update(fh.read(FP_SAMPLE_BYTES))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"base model {d}: cannot fingerprint it ({e})") from e
    return h.hexdigest()


def base_model_record(model_dir: str | Path, only_trainable: bool) -> dict:
    """What ``trainer_state.json`` gets (``{}`` for a checkpoint that holds every tensor)."""
    if not only_trainable:
        return {}
    return {"base_model": {"path": str(Path(model_dir).resolve()), "fingerprint": base_fingerprint(model_dir)}}


def check_base_model(state: dict, model_dir: str | Path | None, ckpt: str | Path) -> bool:
    """True when the checkpoint (trainer state ``state``) holds only the trainable tensors and ``model_dir``
    is its base; False when it holds everything; CheckpointError when the base is missing or differs."""
    rec = state.get("base_model")
    if not rec:
        return False
    flag = "--init_from (or export_hf.py --base)"
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{ckpt} holds only the trainable tensors (--only_save_trainable); it needs its base "
                              f"model {rec['path']} through {flag}, but {model_dir or 'none'} is not a model dir")
    fp = base_fingerprint(model_dir)
    if fp != rec["fingerprint"]:
        raise CheckpointError(f"{ckpt} holds only the trainable tensors (--only_save_trainable) of base model "
                              f"{rec['path']} (fingerprint {rec['fingerprint'][:16]}...), but {flag} {model_dir} "
                              f"is a different model (fingerprint {fp[:16]}...); give the base it was trained from")
    return True

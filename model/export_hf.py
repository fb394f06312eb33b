"""Exports a training checkpoint (sharded DCP) to an HF-format ChameleonForConditionalGeneration directory.

    python model/export_hf.py --ckpt output/7B/epoch0-iter1000 --out output/7B/hf-epoch0-iter1000
    python model/export_hf.py --ckpt output/7B/epoch0 --out /tmp/hf --dtype bf16 --vq_from ckpts/chameleon-7b
    python model/export_hf.py --ckpt output/7B/epoch0 --out /tmp/lumina --layout lumina --dtype bf16

One process, no GPU: the shards of every rank are read into one full model (torch.distributed.checkpoint
reshards on load), so it needs CPU memory for the whole model in fp32 (about 28 GB for 7B). The result
loads with ``ChameleonForConditionalGeneration.from_pretrained(out)``. The VQ model, which training does
not keep, is copied from ``--vq_from`` (default: the run's ``--init_from`` recorded in the checkpoint); when
that has none (Lumina's 7B releases) or cannot be read, the export holds none either, as Lumina's releases
(transformers initialises it at load and says so; the tokenizer bundle's VQGAN encodes and decodes images).
It never holds a VQ model nobody trained or loaded. A ``--vq_from`` that cannot be read is an error.
Epoch checkpoints already hold this export in ``epoch{E}/hf/`` unless the run had ``--no_export_hf``.
``--layout lumina`` writes Lumina-mGPT's layout instead (its ChameleonXLLMXForConditionalGeneration
opens it; q/k norms [model_parallel_size, head_dim], sharded safetensors with an index, no VQ model):
see model/lumina_layout.py.
A LoRA run exports the merged model into ``--out`` and the peft adapter into ``--out/adapter/`` (see
model/training/lora.py); a ``--only_save_trainable`` checkpoint is combined with its base (``--base``, default the
run's --init_from; refused if it is another model, see model/training/trainable.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch

from model.chameleon_lm import ChameleonLM, ModelLoadError, build_chameleon_lm, config_from_dict, read_vq_weights
from model.training.checkpointing import CheckpointError, load_dcp_state, read_train_state, save_hf
from model.lumina_layout import LuminaLayoutError, save_lumina
from model.training.lora import LoraError, apply_lora, merged_hf_state
from model.training.trainable import apply_trainable, check_base_model, load_base_weights, saved_model_keys

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_lm_from_checkpoint(ckpt: str | Path, base: str | Path | None = None) -> ChameleonLM:
    """The checkpoint's model as one unsharded ChameleonLM on the CPU (fp32), in eval mode. A LoRA run's model
    keeps its peft adapters; a --only_save_trainable checkpoint is put on top of ``base`` (default: the run's
    --init_from), refused if that is not the model it was trained from."""
    ckpt = Path(ckpt)
    state = read_train_state(ckpt)  # complete, right format
    config = config_from_dict(json.loads((ckpt / "config.json").read_text()), where=str(ckpt / "config.json"))
    args = json.loads((ckpt / "args.json").read_text())
    lm = build_chameleon_lm(config, device="meta")
    apply_trainable(lm, args.get("trainable"), lora=apply_lora(lm, args))  # the run's LoRA wrapping and trainables
    lm.to_empty(device="cpu")
    lm.reset_nonpersistent_buffers("cpu")
    base = base or args.get("init_from") or (Path(args.get("output_dir", ".")) / "starting_point")
    keys = None
    if check_base_model(state, base, ckpt):  # frozen tensors from the base, the checkpoint's trainables on top
        keys = saved_model_keys(load_base_weights(lm, base), True)
    sd = lm.state_dict()
    with warnings.catch_warnings():  # "no process group: assuming a single process" is exactly the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # every rank's shards into full tensors; no code run
        load_dcp_state({"model": {k: v for k, v in sd.items() if keys is None or k in keys}}, ckpt)
    lm.load_state_dict(sd)
    return lm.eval()


def export_checkpoint(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                      vq_from: str | Path | None = None, base: str | Path | None = None,
                      layout: str = "hf") -> Path:
    ckpt = Path(ckpt)
    lm = load_lm_from_checkpoint(ckpt, base)
    args = json.loads((ckpt / "args.json").read_text())
    if dtype is None:
        dtype = "bf16" if args.get("precision") == "bf16" else "fp16" if args.get("precision") == "fp16" else "fp32"
    sd = {k: v.detach() for k, v in lm.state_dict().items()}
    sd = merged_hf_state(sd, lm, Path(out) / "adapter", base=base or args.get("init_from"))  # LoRA: adapter + merged
    if layout == "lumina":
        return save_lumina(sd, lm.config, out, dtype=DTYPES[dtype], flags=args)  # Lumina's releases hold no VQ model
    src = vq_from or args.get("init_from") or (Path(args.get("output_dir", ".")) / "starting_point")
    try:
        vq = read_vq_weights(Path(src))
    except (ModelLoadError, OSError) as e:
        if vq_from is not None:  # asked for by name: not having it is an error, not a quiet omission
            raise ModelLoadError(f"--vq_from {vq_from}: cannot read its VQ model ({e})") from e
        logger.warning("cannot read the VQ model of %s (%s): the export holds no VQ model (as Lumina's releases); "
                       "pass --vq_from DIR to copy one", src, e)
        vq = {}
    else:
        if not vq and vq_from is not None:
            raise ModelLoadError(f"--vq_from {vq_from}: holds no VQ model (no model.vqmodel.* tensors)")
        if not vq:
            logger.info("%s holds no VQ model (a Lumina release?): the export holds none either; pass --vq_from "
                        "DIR to copy one", src)
    return save_hf(sd, lm.config, out, dtype=DTYPES[dtype], vq_state_dict=vq)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (epoch{E} or epoch{E}-iter{I})")
    p.add_argument("--out", type=Path, required=True, help="directory to write the HF-format model into")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the run's --precision; fp32 for fp32/tf32)")
    p.add_argument("--vq_from", type=Path, default=None,
                   help="HF dir to copy the VQ model (model.vqmodel.*) from; an error if it has none (default: the "
                        "run's --init_from; when that has none, the export holds no VQ model, as Lumina's releases)")
    p.add_argument("--layout", choices=["hf", "lumina"], default="hf",
                   help="hf: transformers' layout (default); lumina: Lumina-mGPT's (its own tools open it)")
    p.add_argument("--base", type=Path, default=None,
                   help="base model of a --only_save_trainable checkpoint (default: the run's --init_from; "
                        "refused unless it is the model the run started from)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = export_checkpoint(a.ckpt, a.out, dtype=a.dtype, vq_from=a.vq_from, base=a.base, layout=a.layout)
    except (CheckpointError, ModelLoadError, LuminaLayoutError, LoraError) as e:
        logger.error("%s", e)
        return 1
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

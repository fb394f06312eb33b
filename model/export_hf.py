"""Exports a training checkpoint (sharded DCP) to an HF-format ChameleonForConditionalGeneration directory.

    python model/export_hf.py --ckpt output/7B/epoch0-iter1000 --out output/7B/hf-epoch0-iter1000
    python model/export_hf.py --ckpt output/7B/epoch0 --out /tmp/hf --dtype bf16 --vq_from ckpts/chameleon-7b
    python model/export_hf.py --ckpt output/7B/epoch0 --out /tmp/lumina --layout lumina --dtype bf16

One process, no GPU: the shards of every rank are read into one full model (torch.distributed.checkpoint
reshards on load), so it needs CPU memory for the whole model in fp32 (about 28 GB for 7B). The result
loads with ``ChameleonForConditionalGeneration.from_pretrained(out)``. The VQ model, which training does
not keep, is copied from ``--vq_from`` (default: the run's ``--init_from`` recorded in the checkpoint).
Epoch checkpoints already hold this export in ``epoch{E}/hf/`` unless the run had ``--no_export_hf``.
``--layout lumina`` writes Lumina-mGPT's layout instead (its ChameleonXLLMXForConditionalGeneration
opens it; q/k norms [model_parallel_size, head_dim], sharded safetensors with an index, no VQ model):
see model/lumina_layout.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch

from model.chameleon_lm import ChameleonLM, ModelLoadError, build_chameleon_lm, config_from_dict, read_hf_weights
from model.checkpointing import CheckpointError, load_dcp_state, read_train_state, save_hf
from model.lumina_layout import LuminaLayoutError, save_lumina

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_lm_from_checkpoint(ckpt: str | Path) -> ChameleonLM:
    """The checkpoint's model as one unsharded ChameleonLM on the CPU (fp32), in eval mode."""
    ckpt = Path(ckpt)
    read_train_state(ckpt)  # complete, right format
    config = config_from_dict(json.loads((ckpt / "config.json").read_text()), where=str(ckpt / "config.json"))
    lm = build_chameleon_lm(config, device="meta")
    lm.to_empty(device="cpu")
    lm.reset_nonpersistent_buffers("cpu")
    sd = lm.state_dict()
    with warnings.catch_warnings():  # "no process group: assuming a single process" is exactly the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp_state({"model": sd}, ckpt)  # every rank's shards into full tensors; no code run
    lm.load_state_dict(sd)
    return lm.eval()


def export_checkpoint(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                      vq_from: str | Path | None = None, layout: str = "hf") -> Path:
    ckpt = Path(ckpt)
    lm = load_lm_from_checkpoint(ckpt)
    args = json.loads((ckpt / "args.json").read_text())
    if dtype is None:
        dtype = "bf16" if args.get("precision") == "bf16" else "fp16" if args.get("precision") == "fp16" else "fp32"
    if layout == "lumina":
        return save_lumina(lm.state_dict(), lm.config, out, dtype=DTYPES[dtype], flags=args)
    vq = None
    src = vq_from or args.get("init_from") or (Path(args.get("output_dir", ".")) / "starting_point")
    try:
        full = read_hf_weights(Path(src), lm.config, with_vq=True)
        vq = {k: v for k, v in full.items() if ".vqmodel." in k} or None
    except (ModelLoadError, OSError) as e:
        logger.warning("no VQ-model weights from %s (%s)", src, e)
    sd = {k: v.detach() for k, v in lm.state_dict().items()}
    return save_hf(sd, lm.config, out, dtype=DTYPES[dtype], vq_state_dict=vq)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (epoch{E} or epoch{E}-iter{I})")
    p.add_argument("--out", type=Path, required=True, help="directory to write the HF-format model into")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the run's --precision; fp32 for fp32/tf32)")
    p.add_argument("--vq_from", type=Path, default=None,
                   help="HF dir to take the VQ model from (default: the run's --init_from)")
    p.add_argument("--layout", choices=["hf", "lumina"], default="hf",
                   help="hf: transformers' layout (default); lumina: Lumina-mGPT's (its own tools open it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = export_checkpoint(a.ckpt, a.out, dtype=a.dtype, vq_from=a.vq_from, layout=a.layout)
    except (CheckpointError, ModelLoadError, LuminaLayoutError) as e:
        logger.error("%s", e)
        return 1
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

r"""Writes a tiny HF-format Chameleon checkpoint whose vocabulary fits a tokenizer bundle.

    python model/make_tiny_model.py --tokenizer_dir /tmp/tiny_bundle --out /tmp/tiny_model
    python model/make_tiny_model.py --tokenizer_dir /tmp/tiny_bundle --out /tmp/tiny_model --hidden_size 128 \
        --num_layers 4 --seed 1 --zero_image_head

The output is what ``ChameleonForConditionalGeneration.save_pretrained`` writes (``config.json``,
``generation_config.json``, ``model.safetensors``) and loads with ``from_pretrained``:

- ``vocab_size`` is the bundle's vocabulary size; ``vocabulary_map`` is the bundle's ``text_tokenizer.json``
  vocabulary plus ``"<image>"`` -> the id of ``<reserved08707>`` (as transformers' conversion script does);
  ``bos/eos/pad_token_id`` are the ids of ``<s>``, ``</s>``, ``<pad>``, found by name.
- The decoder is tiny but trainable (default hidden 64, 2 layers, 4 heads), initialised by transformers
  from ``--seed``: the same arguments write the same bytes.
- The VQ model (``model.vqmodel``, which training drops) takes the bundle's VQGAN encoder, quantizer
  and quant convs when its shapes fit transformers' VQ module (every channel count divisible by 32, as
  GroupNorm(32) needs; the tiny bundle's does), so the checkpoint is complete; otherwise it is a small
  valid random VQ model.
- ``--zero_image_head``: Lumina-mGPT's starting-point preparation, the image-code rows of ``lm_head``
  set to zero (also available for any HF dir as ``model.chameleon_lm.zero_image_head``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import yaml

logger = logging.getLogger(__name__)

BOS, EOS, PAD, IMAGE_PLACEHOLDER = "<s>", "</s>", "<pad>", "<reserved08707>"


def _bundle_vocab(tokenizer_dir: Path) -> tuple[dict[str, int], int]:
    from tokenizers import Tokenizer

    path = tokenizer_dir / "text_tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"--tokenizer_dir {tokenizer_dir}: no text_tokenizer.json (make one with "
                         f"python model/make_tiny_bundle.py --out DIR)")
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    for name in (BOS, EOS, PAD, IMAGE_PLACEHOLDER):
        if name not in vocab:
            raise SystemExit(f"{path}: the vocabulary has no {name!r} (not a Chameleon vocabulary)")
    return vocab, size


def _vq_from_bundle(tokenizer_dir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(HF vq_config dict, model.vqmodel.* weights) from the bundle's taming VQGAN, or None if it does not fit."""
    try:
        params = yaml.safe_load((tokenizer_dir / "vqgan.yaml").read_text())["model"]["params"]
        dd = params["ddconfig"]
        cfg = {"embed_dim": int(params["embed_dim"]), "num_embeddings": int(params["n_embed"]),
               "double_latent": bool(dd["double_z"]), "latent_channels": int(dd["z_channels"]),
               "resolution": int(dd["resolution"]), "in_channels": int(dd["in_channels"]),
               "base_channels": int(dd["ch"]), "channel_multiplier": [int(c) for c in dd["ch_mult"]],
               "num_res_blocks": int(dd["num_res_blocks"]), "attn_resolutions": list(dd["attn_resolutions"]),
               "dropout": float(dd.get("dropout", 0.0))}
        if any(cfg["base_channels"] * m % 32 for m in cfg["channel_multiplier"]):
            return None
        ckpt = torch.load(tokenizer_dir / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        logger.info("bundle VQGAN not usable for the HF VQ model (%s); using a random one", e)
        return None
    keep = ("encoder.", "quantize.embedding.", "quant_conv.", "post_quant_conv.")
    return cfg, {f"model.vqmodel.{k}": v for k, v in ckpt.items() if k.startswith(keep)}


# a small VQ config that transformers can build (channels divisible by 32); used when the bundle's does not fit
FALLBACK_VQ = {"embed_dim": 8, "num_embeddings": 8192, "double_latent": False, "latent_channels": 32,
               "resolution": 256, "in_channels": 3, "base_channels": 32, "channel_multiplier": [1, 1, 1, 1, 2],
               "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0}


def make_tiny_model(tokenizer_dir: str | Path, out: str | Path, *, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, intermediate_size: int | None = None, max_position_embeddings: int = 4096,
                    seed: int = 0, zero_image_head: bool = False) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from model.chameleon_lm import image_token_ids

    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    if hidden_size % num_heads:
        raise SystemExit(f"--hidden_size {hidden_size} must be divisible by --num_heads {num_heads}")
    vocab, vocab_size = _bundle_vocab(tokenizer_dir)
    vq = _vq_from_bundle(tokenizer_dir)
    vq_cfg, vq_sd = vq if vq is not None else (FALLBACK_VQ, None)
    vocabulary_map = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    vocabulary_map["<image>"] = vocab[IMAGE_PLACEHOLDER]
    config = ChameleonConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD], vocabulary_map=vocabulary_map, vq_config=vq_cfg, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config)
    if vq_sd is not None:
        try:
            model.load_state_dict(vq_sd, strict=False, assign=False)
            missing = [k for k in model.model.vqmodel.state_dict() if f"model.vqmodel.{k}" not in vq_sd]
            if missing:
                raise ValueError(f"bundle VQGAN lacks {missing[:3]}")
        except (RuntimeError, ValueError) as e:
            logger.info("bundle VQGAN weights do not fit transformers' VQ model (%s); it stays random", e)
    if zero_image_head:
        with torch.no_grad():
            model.lm_head.weight[image_token_ids(config)] = 0
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for n_, p in model.named_parameters() if ".vqmodel." not in n_)
    logger.info("wrote %s: vocab %d, hidden %d, %d layers, %d parameters without the VQ model", out, vocab_size,
                hidden_size, num_layers, n)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer_dir", type=Path, required=True, help="tokenizer bundle (text_tokenizer.json, vqgan.*)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the HF-format checkpoint into")
    p.add_argument("--hidden_size", type=int, default=64, help="model width (default 64)")
    p.add_argument("--num_layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--num_heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--intermediate_size", type=int, default=None, help="MLP width (default 4 * hidden_size)")
    p.add_argument("--max_position_embeddings", type=int, default=4096, help="context length in the config")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    p.add_argument("--zero_image_head", dest="zero_image_head", action="store_true", default=False,
                   help="zero the image-code rows of lm_head (Lumina's starting point)")
    p.add_argument("--no_zero_image_head", dest="zero_image_head", action="store_false",
                   help="keep lm_head as initialised (default)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = make_tiny_model(a.tokenizer_dir, a.out, hidden_size=a.hidden_size, num_layers=a.num_layers,
                          num_heads=a.num_heads, intermediate_size=a.intermediate_size,
                          max_position_embeddings=a.max_position_embeddings, seed=a.seed,
                          zero_image_head=a.zero_image_head)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()

"""The Chameleon image tokenizer: a VQGAN (taming-transformers Encoder/Decoder + nearest-code quantizer).

Pixels in [-1, 1] of shape [B, 3, H, W] (H, W multiples of 16 for Chameleon's 16x downsampling) become
codes [B, H/16, W/16] in [0, n_embed), and codes become pixels again. The module layout and state-dict keys
are those of taming-transformers' ``VQModel`` (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
``quant_conv.*``, ``post_quant_conv.*``), so Meta's ``vqgan.ckpt`` loads into it strictly.

    cfg = VQGANConfig.from_yaml("bundle/vqgan.yaml")
    vq = load_vqgan("bundle/vqgan.yaml", "bundle/vqgan.ckpt", device="cpu")
    codes = vq.encode(pixels)          # LongTensor [B, H/16, W/16]
    pixels = vq.decode(codes)          # float32 [B, 3, H, W] in [-1, 1]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder

from model.tokenizer.vqgan_fast import FastEncoder

logger = logging.getLogger(__name__)

# Keys a training checkpoint may carry besides the model (the GAN discriminator and LPIPS of taming's
# VQLoss live under ``loss.``); they are not part of the tokenizer and are skipped when loading.
IGNORED_CKPT_PREFIXES = ("loss.",)

# Rows of z compared against the whole codebook at once: bounds the [rows, n_embed] distance matrix to
# 4096 * 8192 * 4 bytes = 128 MiB (a 1024x1024 image has 4096 latent positions).
QUANTIZE_CHUNK = 4096


class BundleError(ValueError):
    """A tokenizer bundle (text_tokenizer.json, vqgan.yaml, vqgan.ckpt) is missing or does not fit together."""


@dataclass(frozen=True)
class VQGANConfig:
    """``model.params`` of a taming-transformers ``vqgan.yaml`` (``lossconfig`` is ignored)."""

    embed_dim: int
    n_embed: int
    z_channels: int
    resolution: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = False

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each side (16 for Chameleon)."""
        return 2 ** (len(self.ch_mult) - 1)

    def ddconfig(self) -> dict[str, Any]:
        return {"double_z": self.double_z, "z_channels": self.z_channels, "resolution": self.resolution,
                "in_channels": self.in_channels, "out_ch": self.out_ch, "ch": self.ch,
                "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                "attn_resolutions": list(self.attn_resolutions), "dropout": self.dropout}

    def to_yaml_dict(self) -> dict[str, Any]:
        """The layout of Chameleon's vqgan.yaml (``model.params.{embed_dim, n_embed, ddconfig}``)."""
        return {"model": {"target": "taming.models.vqgan.VQModel",
                          "params": {"embed_dim": self.embed_dim, "n_embed": self.n_embed,
                                     "ddconfig": self.ddconfig()}}}

    @classmethod
    def from_dict(cls, params: dict, where: str = "vqgan config") -> "VQGANConfig":
        """Builds from ``model.params`` (a dict with ``embed_dim``, ``n_embed`` and ``ddconfig``)."""
        if not isinstance(params, dict):
            raise BundleError(f"{where}: model.params must be a mapping, got {type(params).__name__}")
        dd = params.get("ddconfig")
        missing = [k for k in ("embed_dim", "n_embed") if k not in params]
        if not isinstance(dd, dict):
            missing.append("ddconfig")
            dd = {}
        missing += [f"ddconfig.{k}" for k in ("z_channels", "resolution", "in_channels", "out_ch", "ch",
                                              "ch_mult", "num_res_blocks") if k not in dd]
        if missing:
            raise BundleError(f"{where}: model.params lacks {', '.join(missing)}")
        try:
            cfg = cls(embed_dim=int(params["embed_dim"]), n_embed=int(params["n_embed"]),
                      z_channels=int(dd["z_channels"]), resolution=int(dd["resolution"]),
                      in_channels=int(dd["in_channels"]), out_ch=int(dd["out_ch"]), ch=int(dd["ch"]),
                      ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                      num_res_blocks=int(dd["num_res_blocks"]),
                      attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions") or ()),
                      dropout=float(dd.get("dropout", 0.0)), double_z=bool(dd.get("double_z", False)))
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: bad value in model.params ({e})") from e
        if not cfg.ch_mult:
            raise BundleError(f"{where}: ddconfig.ch_mult is empty")
        bad = [c for c in [cfg.ch * m for m in cfg.ch_mult] if c % 32]
        if bad:
            raise BundleError(f"{where}: channel counts {bad} (ch * ch_mult) are not multiples of 32, "
                              f"which taming's GroupNorm(32 groups) needs")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "VQGANConfig":
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except FileNotFoundError as e:
            raise BundleError(f"{path}: no such file") from e
        except yaml.YAMLError as e:
            raise BundleError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict) or "params" not in doc["model"]:
            raise BundleError(f"{path}: expected a mapping with model.params (taming-transformers layout)")
        return cls.from_dict(doc["model"]["params"], where=str(path))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by squared L2 distance, |z|^2 + |e|^2 - 2 z.e in float32.

    This is the expression taming's VectorQuantizer2 evaluates; computing the distance another way (e.g.
    ``torch.cdist``) rounds differently and flips near-ties, so codes would differ from the reference.
    """

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> codes LongTensor [B, h, w]."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        emb = self.embedding.weight.float()
        emb_sq = torch.sum(emb ** 2, dim=1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, flat.shape[0], QUANTIZE_CHUNK):
            zc = flat[start:start + QUANTIZE_CHUNK]
            d = torch.sum(zc ** 2, dim=1, keepdim=True) + emb_sq - 2 * torch.einsum("bd,dn->bn", zc, emb.t())
            out[start:start + QUANTIZE_CHUNK] = torch.argmin(d, dim=1)
        return out.view(b, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> z [B, C, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """taming's VQModel without the loss: encoder, quant_conv, quantize, post_quant_conv, decoder."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        dd = config.ddconfig()
        self.encoder = Encoder(**dd)
        # taming's Decoder prints the z shape on construction; keep library output on logging only.
        with contextlib.redirect_stdout(io.StringIO()):
            self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.channels_last = False
        # The encoder's CPU fast path (model/tokenizer/vqgan_fast.py): same bits as the modules in channels_last
        # (which is opt-in: see load_vqgan).
        self.fast_encode = True
        self._fast = FastEncoder(self.encoder, self.quant_conv)

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    def use_channels_last(self, enabled: bool = True) -> "VQGAN":
        """Runs the convolutions in NHWC layout (on CPU with the fast path, vqgan_fast.py): faster on a
        real-size VQGAN, but the codes can differ from Lumina's NCHW ones (see ``load_vqgan``)."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        f = self.config.downsample
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"pixels must be [B, {self.config.in_channels}, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image size {pixels.shape[2]}x{pixels.shape[3]} (HxW) is not a multiple of {f}")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float [B, 3, H, W] in [-1, 1] -> codes LongTensor [B, H/16, W/16] on the module's device."""
        self._check_pixels(pixels)
        x = pixels.to(self.device, torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precise_cuda(x.device):
            if self.fast_encode and self.channels_last and self._fast.supports(x):
                z = self._fast(x)
            else:
                z = self.quant_conv(self.encoder(x))
            return self.quantize.codes(z)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> pixels float32 [B, 3, 16h, 16w], clamped to [-1, 1]."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, h, w], got {tuple(codes.shape)}")
        codes = codes.to(self.device, torch.long)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed):
            raise ValueError(f"codes must lie in [0, {self.config.n_embed}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        z = self.quantize.embed(codes)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with precise_cuda(z.device):
            return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0).contiguous()


@contextlib.contextmanager
def precise_cuda(device: torch.device):
    """On CUDA, convolutions default to TF32, which changes codes near ties; encode in full float32."""
    if device.type != "cuda":
        yield
        return
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_state_dict_strict(model: VQGAN, state_dict: dict, where: str) -> None:
    """Loads every model key, ignoring only ``loss.*``; names missing, unexpected and mis-shaped keys."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_CKPT_PREFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs vqgan.yaml {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) have shapes that do not fit vqgan.yaml: "
                        + "; ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
    if missing:
        problems.append(f"{len(missing)} key(s) missing: " + ", ".join(missing[:10])
                        + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:10])
                        + (" ..." if len(unexpected) > 10 else ""))
    if problems:
        raise BundleError(f"{where}: checkpoint does not fit the VQGAN built from vqgan.yaml: "
                          + " | ".join(problems))
    model.load_state_dict(sd, strict=True)


def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """Reads ``{"state_dict": ...}`` with ``weights_only=True`` (no arbitrary code from the file)."""
    ckpt_path = Path(ckpt_path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise BundleError(f"{ckpt_path}: no such file") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise BundleError(f"{ckpt_path}: cannot be read as a torch checkpoint with weights_only=True "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise BundleError(f"{ckpt_path}: expected a checkpoint dict with a 'state_dict' entry "
                          f"(taming-transformers layout)")
    return sd


def load_vqgan(yaml_path: str | os.PathLike, ckpt_path: str | os.PathLike,
               device: str | torch.device = "cpu", channels_last: bool | None = None) -> VQGAN:
    """Builds the VQGAN from vqgan.yaml and loads vqgan.ckpt strictly; eval mode, float32.

    ``channels_last`` (and with it the CPU fast path of vqgan_fast.py) is opt-in on every device: the
    default NCHW layout gives Lumina's codes bit for bit on its golden outputs (tests/test_lumina_golden.py),
    while channels_last, whose convolutions and GroupNorm round differently, changed 1-3 codes (beyond the
    recorded float ties) in 8 of the 16 images compared code for code at 512 px there (relative distance
    gaps up to 2%).
    """
    config = VQGANConfig.from_yaml(yaml_path)
    model = VQGAN(config)
    load_state_dict_strict(model, read_checkpoint(ckpt_path), str(ckpt_path))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BundleError(f"device {device} requested for the VQGAN, but torch.cuda.is_available() is False")
    model = model.to(device).eval().requires_grad_(False)
    if channels_last is None:
        channels_last = False
    model.use_channels_last(channels_last)
    logger.info("loaded VQGAN %s (%d parameters, %d codes of dim %d) on %s", ckpt_path,
                count_parameters(model), config.n_embed, config.embed_dim, device)
    return model

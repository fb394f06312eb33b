"""Fits a VQGAN to a folder of images with the plain VQ-VAE recipe, on the CPU (minutes for the tiny one).

    python model/make_tiny_bundle.py --out B --fit_images DIR [--fit_steps N]    # the usual way in
    vq = fit_vqgan(build_tiny_vqgan(0), load_fit_images(DIR), FitConfig())

What it trains is the module layout of ``model/tokenizer/vqgan.py`` (taming's ``VQModel`` keys), so the
result is saved as the same ``vqgan.ckpt`` and every loader, the fast CPU encoder and the decoder read it
unchanged. The recipe (van den Oord et al. 2017, "Neural Discrete Representation Learning"):

- loss = mean squared reconstruction error + ``|sg(z) - e|^2`` (codebook) + ``beta |z - sg(e)|^2``
  (commitment), with the straight-through estimator carrying the decoder's gradient past the argmin;
- a plain autoencoder first (``warmup_frac`` of the steps), then the codebook starts from encoder outputs
  (random latents of a few batches, with a little noise), and codes no latent picked for
  ``restart_every`` steps are restarted at latents of the current batch, drawn by their quantization
  error, so the codes track the encoder as it moves and go where pictures are served worst;
- only ``codes_in_play`` codes (256) take part; the rest of the 8192 are set to repeat them at the end,
  so encoding never picks them (argmin takes the first of equal distances) and a language model that
  samples one still gets a patch of the pictures.

No GAN and no perceptual loss: the squared error is the whole pixel loss. Training runs on whole images,
at their size and smaller (see ``_ImageSampler`` for why not crops).

Two things make flat colours learnable in the tiny layout, whose GroupNorms (taming's 32 groups on 32
channels) normalise every channel over the picture on its own, which erases a flat colour's level: the
encoder's and the decoder's streams are carried through their norms at a scale where their ``eps``
dominates, so they subtract the mean and keep the scale (``_MeanOnlyStream``), and the decoder's last
channels come in tied pairs, so a difference of two swishes draws a colour whose strength does not depend on
the shape's size (``_PairedDecoderOutput``). A third makes the codes learnable for a language model: each
code reads only its patch's neighbourhood (``_LocalEncoder``), so one flat background is one code, not
dozens. All three are only values of taming's own weights in the saved checkpoint. bench/RESULTS.md has
what this reaches on the demo's pictures (after the default steps 22.2 dB over the demo's 32 pictures, all
32 read back as their colour, shape and background) and how it was found.

Seeded: the same images, config and seed give the same weights on the same machine and torch build.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from model.tokenizer.vqgan import VQGAN

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class FitConfig:
    """How a VQGAN is fitted; the defaults fit the tiny bundle's VQGAN to the demo's shapes (~92 s, 2 threads)."""

    steps: int = 1000
    """optimizer steps (Adam)"""
    batch_size: int = 4
    """images per step (all of one size)"""
    lr: float = 1e-3
    """Adam learning rate, held for the first half, then cosine to lr/10"""
    beta: float = 0.25
    """weight of the commitment loss"""
    warmup_frac: float = 0.3
    """share of the steps trained as a plain autoencoder (no quantization) before the codebook is set from
    encoder outputs: the decoder learns much faster from continuous latents than through the argmin"""
    codes_in_play: int = 256
    """codes the fit uses (the others repeat them): the demo's flat shapes need a few hundred, and the fewer
    distinct codes a picture type has, the easier its token sequences are for a language model to learn"""
    restart_every: int = 25
    """steps after which a code no latent picked is restarted at a latent of the current batch"""
    min_scale: float = 0.5
    """images are also trained on at sizes down to this factor (cheaper steps, shapes at other sizes)"""
    paired_out: float = 8.0
    """the decoder's last-level channels come in tied pairs, the pair's output norm scaled by this at the
    start (0: no pairs); see ``_PairedDecoderOutput``"""
    encoder_mean_only: bool = True
    """the encoder's residual stream is carried through its GroupNorms at a scale where their epsilon
    dominates, so they subtract the mean but keep the scale; see ``_MeanOnlyStream``"""
    decoder_mean_only: bool = True
    """the same for the decoder's residual stream: a channel that barely varies over a picture stays small
    instead of being normalised to full strength"""
    local_codes: bool = True
    """each code reads only its patch's neighbourhood (the encoder's middle convs act on one position, its
    attention adds nothing), so alike patches get alike codes; see ``_LocalEncoder``"""
    seed: int = 0


@dataclass
class FitReport:
    """What a fit reached: the last steps' mean reconstruction MSE (pixels in [-1, 1]) and codes in use."""

    steps: int
    recon_mse: float
    codes_used: int

    @property
    def psnr(self) -> float:
        """PSNR in dB of the training images, for pixels in [0, 1] (the MSE in [-1, 1] is 4x that in [0, 1])."""
        return 10 * math.log10(4.0 / max(self.recon_mse, 1e-12))


def load_fit_images(folder: str | os.PathLike, limit: int | None = None) -> list[torch.Tensor]:
    """The images of ``folder`` (recursively, sorted by path) as float [3, H, W] tensors in [-1, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--fit_images {folder}: not a directory")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        paths = paths[:limit]
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        except OSError as e:  # one unreadable file is reported and skipped, not fatal
            logger.warning("skipping %s: cannot be read as an image (%s)", p, e)
            continue
        images.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    if not images:
        raise FileNotFoundError(f"--fit_images {folder}: no readable images ({', '.join(IMAGE_SUFFIXES)})")
    return images


class _ImageSampler:
    """Batches of whole images of one size, each image resized by one of a few factors in [min_scale, 1].

    Whole images, not crops: taming's GroupNorm(32) on 32-channel levels normalises each channel over the
    picture, so a crop of flat background carries no colour at all after it; the decoder learns colours
    from how the picture's parts differ. Smaller copies of a picture cost less to train on and teach the
    same shapes at other sizes (pre-tokenization resizes pictures before encoding).
    """

    def __init__(self, images: list[torch.Tensor], cfg: FitConfig, gen: torch.Generator, multiple: int):
        self.cfg, self.gen = cfg, gen
        self.groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        scales = np.linspace(cfg.min_scale, 1.0, 3) if cfg.min_scale < 1.0 else [1.0]
        for img in images:
            _, h, w = img.shape
            for s in scales:
                nh, nw = (max(multiple, round(v * s / multiple) * multiple) for v in (h, w))
                x = img if (nh, nw) == (h, w) else F.interpolate(
                    img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
                self.groups.setdefault((nh, nw), []).append(x.clamp(-1, 1).contiguous())
        self.keys = sorted(self.groups)
        # a group is drawn with probability proportional to its images times the pixels they save
        sizes = torch.tensor([len(self.groups[k]) / (k[0] * k[1]) for k in self.keys], dtype=torch.float64)
        self.weights = sizes / sizes.sum()

    def batch(self) -> torch.Tensor:
        key = self.keys[int(torch.multinomial(self.weights, 1, generator=self.gen))]
        group = self.groups[key]
        idx = torch.randint(len(group), (self.cfg.batch_size,), generator=self.gen).tolist()
        return torch.stack([group[i] for i in idx])


class _MeanOnlyNorm(nn.Module):
    """A GroupNorm's affine map after subtracting the group mean only: what ``nn.GroupNorm`` computes when the
    input's variance is far below its ``eps`` (then ``(x - mean) / sqrt(var + eps)`` is ``(x - mean) /
    sqrt(eps)``), with the ``1 / sqrt(eps)`` folded into the weight at the end of the fit."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = self.norm.num_groups
        mean = x.reshape(b, g, -1).mean(-1, keepdim=True)
        x = (x.reshape(b, g, -1) - mean).reshape(x.shape)
        return x * self.norm.weight.view(1, c, 1, 1) + self.norm.bias.view(1, c, 1, 1)


class _MeanOnlyStream:
    """Why: taming's GroupNorm(32 groups) on the tiny layout's 32 channels normalises each channel over the
    picture on its own, so a picture of two flat colours leaves each channel only the sign of a difference
    of colours. In the encoder, which colour the shape has is nearly gone from the codes (red, green and blue
    shapes on white encoded 1.6-2.9% apart), and no decoder can draw it back; in the decoder, a channel that
    barely varies is blown up to full strength, so colours come out confused. Subtracting the mean but keeping
    the scale passes the colours (PSNR 16.1 -> 18.0 dB for the encoder with the paired decoder, autoencoder
    alone, bench/RESULTS.md).

    How, with taming's unchanged modules: during the fit every norm that reads a residual stream (the blocks'
    first norms, the attention's norm, ``norm_out``) is a ``_MeanOnlyNorm``. ``bake`` then scales the stream
    by a small ``s`` (``conv_in``, the biases of the convs that carry the stream on: downsampling, upsampling,
    channel-changing shortcuts, and what each block adds to it) so that its variance is ~1e-4 of the norms'
    ``eps``, and multiplies those norms' weights by ``sqrt(eps) / s``: the saved GroupNorms then compute the
    mean-only norm to ~1e-4 relative, in any loader. (The values on the stream are ~1e-5: fine in fp32 and
    bf16, not in fp16.)"""

    def __init__(self, coder: nn.Module):
        if coder.num_res_blocks != 0 and hasattr(coder, "down"):
            raise ValueError("a mean-only encoder stream needs an encoder without down-level blocks (num_res_blocks 0)")
        if any(len(level.attn) for level in getattr(coder, "down", getattr(coder, "up", []))):
            raise ValueError("a mean-only stream needs a coder without attention outside its middle")
        self.coder = coder
        mid = coder.mid
        blocks = [mid.block_1, mid.block_2] + [b for level in getattr(coder, "up", []) for b in level.block]
        # (owner, attribute) of each norm reading the stream; convs adding to it; convs carrying it (bias only)
        self.norms = [(b, "norm1") for b in blocks] + [(mid.attn_1, "norm"), (coder, "norm_out")]
        self.adds = [b.conv2 for b in blocks] + [mid.attn_1.proj_out]
        self.carry = [level.downsample.conv for level in getattr(coder, "down", []) if hasattr(level, "downsample")]
        self.carry += [level.upsample.conv for level in getattr(coder, "up", []) if hasattr(level, "upsample")]
        self.carry += [b.nin_shortcut for b in blocks if hasattr(b, "nin_shortcut")]
        for owner, name in self.norms:
            setattr(owner, name, _MeanOnlyNorm(getattr(owner, name)))

    @torch.no_grad()
    def bake(self, inputs: list[torch.Tensor]) -> float:
        """Puts the GroupNorms back, scaled as the class says, from the stream's largest per-group variance
        over ``inputs`` (each one the coder's input, batch of one); returns the scale s."""
        seen: list[float] = []

        def record(m, inp):
            x = inp[0]
            seen.append(float(x.reshape(x.shape[0], m.norm.num_groups, -1).var(-1, unbiased=False).max()))
        hooks = [getattr(o, n).register_forward_pre_hook(record) for o, n in self.norms]
        try:
            for x in inputs:
                self.coder(x)
        finally:
            for h in hooks:
                h.remove()
        peak = max(seen)
        eps = getattr(self.norms[0][0], self.norms[0][1]).norm.eps
        s = 0.01 * math.sqrt(eps / max(peak, 1e-12))
        for conv in [self.coder.conv_in] + self.adds:
            conv.weight.mul_(s)
            conv.bias.mul_(s)
        for conv in self.carry:
            conv.bias.mul_(s)
        for owner, name in self.norms:
            norm = getattr(owner, name).norm
            norm.weight.mul_(math.sqrt(norm.eps) / s)
            setattr(owner, name, norm)
        return s


class _PairedDecoderOutput:
    """Why: the decoder ends in ``conv_out(swish(norm_out(h)))``, and ``norm_out`` (one channel per group in the
    tiny layout) rescales each channel by the picture's own statistics: a channel that is high on the shape
    and low on the background comes out at +sqrt((1 - p) / p) and -sqrt(p / (1 - p)) for a shape covering p of
    the picture, so the drawn colour would change with the shape's size. A difference of two swishes of the
    same channel at two offsets, ``swish(g n) - swish(g n - 1)``, is a step that is flat on either side of the
    threshold, whatever p: flat colours of the right strength. So the last level's channels are tied in pairs
    (channel i and i + C/2 are the same channel: the convs that write the stream there have equal rows, kept
    equal by summing their gradients), ``norm_out`` starts at weight ``gain`` with the second of each pair
    offset by -1, and ``conv_out`` starts with opposite weights on the two. Plain taming modules throughout:
    the pairs are only equal rows in the saved weights."""

    def __init__(self, decoder: nn.Module, gain: float):
        if decoder.num_res_blocks != 0 or len(decoder.up[0].attn) or decoder.num_resolutions < 2:
            raise ValueError("paired_out supports decoders with one block per level (num_res_blocks 0)")
        c = decoder.conv_out.weight.shape[1]
        self.half = c // 2
        block = decoder.up[0].block[0]
        self.tied = [decoder.up[1].upsample.conv.weight, decoder.up[1].upsample.conv.bias,
                     block.conv2.weight, block.conv2.bias]
        with torch.no_grad():
            for t in self.tied:
                t[self.half:] = t[:self.half]
            decoder.conv_out.weight[:, self.half:] = -decoder.conv_out.weight[:, :self.half]
            decoder.norm_out.weight.fill_(gain)
            decoder.norm_out.bias[self.half:] = -1.0

    def tie_grads(self) -> None:
        """Each pair's rows get the sum of their gradients: equal rows, equal Adam updates, rows stay equal."""
        h = self.half
        for t in self.tied:
            if t.grad is not None:
                g = t.grad[:h] + t.grad[h:]
                t.grad[:h] = g
                t.grad[h:] = g


class _LocalEncoder:
    """Why: a language model learns pictures from their code sequences, and those are only learnable when a
    patch's code says what is in that patch. Taming's encoder ends in convs and an attention at the lowest
    resolution whose reach is the whole picture, so a fit is free to spread one flat background over dozens
    of codes that depend on where the shape is and what colour it has (the demo's 32 pictures at 128x128:
    13 codes per position among the 16 of one background). Here the middle blocks' convs and ``conv_out``
    keep only their centre tap and the attention's output projection stays zero, so a code reads its patch
    and the ~8 pixels around it (``conv_in`` and the downsampling convs); the saved weights are taming's own
    3x3 kernels with zero outer taps. Masked gradients keep them zero under Adam; ``release`` takes the
    gradient hooks off again when the fit ends."""

    def __init__(self, encoder: nn.Module):
        mid = encoder.mid
        convs = [mid.block_1.conv1, mid.block_1.conv2, mid.block_2.conv1, mid.block_2.conv2, encoder.conv_out]
        self.hooks = []
        with torch.no_grad():
            for conv in convs:
                mask = torch.zeros_like(conv.weight)
                kh, kw = mask.shape[-2:]
                mask[..., kh // 2, kw // 2] = 1.0
                conv.weight.mul_(mask)
                self.hooks.append(conv.weight.register_hook(lambda g, m=mask: g * m))
            for t in (mid.attn_1.proj_out.weight, mid.attn_1.proj_out.bias):
                t.zero_()
                self.hooks.append(t.register_hook(torch.zeros_like))

    def release(self) -> None:
        for h in self.hooks:
            h.remove()


def _nearest(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for each row, the distance VectorQuantizer.codes uses."""
    d = (z_flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * z_flat @ codebook.t()
    return d.argmin(1)


def fit_vqgan(model: VQGAN, images: list[torch.Tensor], cfg: FitConfig = FitConfig(),
              progress: bool = True) -> FitReport:
    """Trains ``model`` in place on ``images`` (float [3, H, W] in [-1, 1]); returns it in eval mode."""
    from tqdm.auto import tqdm

    if not images:
        raise ValueError("no images to fit the VQGAN to")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = _ImageSampler(images, cfg, gen, model.config.downsample)
    paired = _PairedDecoderOutput(model.decoder, cfg.paired_out) if cfg.paired_out else None
    stream = _MeanOnlyStream(model.encoder) if cfg.encoder_mean_only else None
    dstream = _MeanOnlyStream(model.decoder) if cfg.decoder_mean_only else None
    local = _LocalEncoder(model.encoder) if cfg.local_codes else None
    model.train().requires_grad_(True)
    model.use_channels_last(True)  # on CPU the convolutions (forward and backward) run faster in NHWC
    codebook = model.quantize.embedding.weight
    n_embed = codebook.shape[0]
    k = min(cfg.codes_in_play, n_embed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    last_used = torch.zeros(k, dtype=torch.long)  # step at which each code was last picked
    recon_hist: list[float] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.quant_conv(model.encoder(x))

    warmup = int(cfg.steps * cfg.warmup_frac)

    def init_codebook() -> None:  # every code a (slightly noisy) encoder output of a few fresh batches
        with torch.no_grad():
            zs = torch.cat([encode(sampler.batch().contiguous(memory_format=torch.channels_last))
                            .permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]) for _ in range(4)])
            pick = torch.randint(len(zs), (k,), generator=gen)
            codebook[:k] = zs[pick] + 0.01 * zs.std() * torch.randn(k, zs.shape[1], generator=gen)

    def update(loss: torch.Tensor) -> None:  # one Adam step; tied decoder rows get their summed gradient
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if paired is not None:
            paired.tie_grads()
        opt.step()

    bar = tqdm(range(1, cfg.steps + 1), desc="fit VQGAN", disable=not progress, mininterval=1.0)
    for step in bar:
        lr = cfg.lr if step <= cfg.steps // 2 else cfg.lr * (0.1 + 0.45 * (1 + math.cos(
            math.pi * (step - cfg.steps // 2) / max(1, cfg.steps - cfg.steps // 2))))
        for g in opt.param_groups:
            g["lr"] = lr
        if step == warmup + 1:
            init_codebook()
        x = sampler.batch().contiguous(memory_format=torch.channels_last)
        z = encode(x)
        b, c, h, w = z.shape
        if step <= warmup:  # a plain autoencoder first: the decoder learns from unquantized latents
            rec = model.decoder(model.post_quant_conv(z))
            recon = F.mse_loss(rec, x)
            update(recon)
            recon_hist.append(recon.detach().item())
            if step % 10 == 0:
                bar.set_postfix(recon=f"{np.mean(recon_hist[-10:]):.4f}", codes="-", refresh=False)
            continue
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        with torch.no_grad():
            idx = _nearest(z_flat, codebook[:k])
        e = codebook[idx]
        codebook_loss = F.mse_loss(e, z_flat.detach())
        commit_loss = F.mse_loss(z_flat, e.detach())
        z_q = (z_flat + (e - z_flat).detach()).view(b, h, w, c).permute(0, 3, 1, 2)  # straight-through
        rec = model.decoder(model.post_quant_conv(z_q))
        recon = F.mse_loss(rec, x)
        update(recon + codebook_loss + cfg.beta * commit_loss)
        last_used[idx.unique()] = step
        recon_hist.append(recon.detach().item())
        if step % cfg.restart_every == 0 and step < cfg.steps * 0.9:
            with torch.no_grad():  # dead codes among the ones in play restart at this batch's latents
                dead = (last_used <= step - cfg.restart_every).nonzero().flatten()
                if len(dead):
                    zf = z_flat.detach()
                    # at latents drawn by their quantization error: new codes go where pictures are served
                    # worst (edges), not into flat areas one code already covers
                    err = ((zf - e.detach()) ** 2).sum(1) + 1e-12
                    src = torch.multinomial(err, len(dead), replacement=True, generator=gen)
                    codebook[dead] = zf[src] + 0.01 * zf.std() * torch.randn(len(dead), c, generator=gen)
                    last_used[dead] = step  # give them a window to be picked
        if step % 10 == 0 or step == cfg.steps:
            in_use = int((last_used > max(0, step - cfg.restart_every)).sum())
            bar.set_postfix(recon=f"{np.mean(recon_hist[-10:]):.4f}", codes=in_use, refresh=False)
    with torch.no_grad():  # the codes out of play repeat those in play: encoding picks the first of equals
        # (argmin), and a language model that samples a repeat still gets a patch of the pictures
        reps = -(-n_embed // k)
        codebook[k:] = codebook[:k].repeat(reps, 1)[:n_embed - k]
    model.eval().requires_grad_(False).use_channels_last(False)
    if local is not None:
        local.release()
    if dstream is not None:  # first, while the encoder still gives the latents the decoder was fitted to
        q = model.quantize
        latents = [model.post_quant_conv(q.embed(q.codes(encode(img[None])))) for img in images]
        scale = dstream.bake(latents)
        logger.info("decoder stream scaled by %.3g: its GroupNorms now subtract the mean only", scale)
    if stream is not None:
        scale = stream.bake([img[None] for img in images])
        logger.info("encoder stream scaled by %.3g: its GroupNorms now subtract the mean only", scale)
    used = int((last_used > max(0, cfg.steps - cfg.restart_every)).sum())
    report = FitReport(cfg.steps, float(np.mean(recon_hist[-20:])), used)
    logger.info("fitted VQGAN: %d steps, reconstruction MSE %.5f (%.1f dB on training images), %d codes in use",
                report.steps, report.recon_mse, report.psnr, report.codes_used)
    return report

"""How many codes change if the encoder's arithmetic is changed (the fusions model/tokenizer/vqgan_fast.py does NOT do).

    python bench/bench_vqgan_variants.py --images 64 --threads 1

On the bench_pretokenize images and real-width VQGAN (seeded random weights), encodes every image with
the default path (model/tokenizer/vqgan_fast.py, bitwise the taming modules) and with each variant, and counts the
codes that differ, with the time of each:

  silu            ``F.silu`` (x / (1 + exp(-x))) instead of taming's ``x * sigmoid(x)``: what a fused
                  GroupNorm+SiLU kernel (oneDNN, Inductor) computes;
  sdpa mid-attn   the mid-block attention through ``F.scaled_dot_product_attention`` instead of
                  bmm + softmax + bmm;
  lumina NCHW     the modules with NCHW parameters and Lumina's channels_last-strided input (the
                  convolutions run in oneDNN's blocked layout: other kernels, other rounding).

Near-ties are what flip: with random weights the nearest code usually wins by a wide margin, so these
counts are a lower bound for a trained codebook.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.bench_pretokenize import REPO, make_bundle, make_images
from data.item_processor import ItemProcessor
from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.vqgan_fast import FastEncoder

logger = logging.getLogger("bench_vqgan_variants")


class SiluEncoder(FastEncoder):
    @staticmethod
    def _norm_swish(norm, x):
        return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), inplace=True)


class SdpaEncoder(FastEncoder):
    def _attn(self, blk, x):
        h_ = blk.norm(x)
        q, k, v = self._conv(blk.q, h_), self._conv(blk.k, h_), self._conv(blk.v, h_)
        b, c, h, w = q.shape
        seq = [t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c) for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*seq)  # scale 1/sqrt(c), as taming's int(c) ** -0.5
        o = o.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self._conv(blk.proj_out, o.contiguous(memory_format=torch.channels_last), add=x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--target_size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "vqgan_variants.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = ChameleonTokenizer.from_bundle(make_bundle(tmp / "bundle"), channels_last=True)  # the fast path
        items = json.loads(make_images(tmp, args.images, args.target_size * 3 // 2).read_text())
        proc = ItemProcessor(tok, args.target_size)
        pixels = [torch.from_numpy(im)[None] for it in items for im in proc.prepare(it, tmp).images]
    vq = tok.vqgan
    nchw = copy.deepcopy(vq).use_channels_last(False)
    variants = {"default (fast path)": FastEncoder(vq.encoder, vq.quant_conv),
                "silu": SiluEncoder(vq.encoder, vq.quant_conv),
                "sdpa mid-attn": SdpaEncoder(vq.encoder, vq.quant_conv),
                "lumina NCHW": lambda x: nchw.quant_conv(nchw.encoder(
                    x[0].permute(1, 2, 0).contiguous().permute(2, 0, 1)[None]))}  # Lumina's HWC -> CHW permute
    seconds = {n: 0.0 for n in variants}
    codes: dict[str, list[torch.Tensor]] = {n: [] for n in variants}
    with torch.no_grad():
        for i, x in enumerate(pixels):
            for name, enc in variants.items():
                t0 = time.perf_counter()
                z = enc(x)
                if i:
                    seconds[name] += time.perf_counter() - t0
                codes[name].append(vq.quantize.codes(z))
            logger.info("image %d/%d", i + 1, len(pixels))
    ref = torch.stack(codes["default (fast path)"])
    report = {"images": len(pixels), "codes": ref.numel(), "torch_threads": torch.get_num_threads(), "variants": {}}
    print(f"| variant | codes differing (of {ref.numel()}) | images differing | s / image (interleaved) |\n|---|---|---|---|")
    for name in variants:
        diff = torch.stack(codes[name]) != ref
        r = {"codes_differing": int(diff.sum()), "images_differing": int(diff.flatten(1).any(1).sum()),
             "seconds_per_image": seconds[name] / max(1, len(pixels) - 1)}
        report["variants"][name] = r
        print(f"| {name} | {r['codes_differing']} | {r['images_differing']} | {r['seconds_per_image']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

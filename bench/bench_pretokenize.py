"""Benchmark: images/s of pre_tokenize.py against a faithful Lumina-mGPT loop and the bare VQGAN encode.

    python bench/bench_pretokenize.py --profile --repeats 2   # 64 images, target 256, as in bench/RESULTS.md
    python bench/bench_pretokenize.py --threads 1             # fairer on a machine shared with other jobs
    python bench/bench_pretokenize.py --device cuda --images 256 --batch_size 32   # GPU (refused without CUDA)
    python bench/bench_pretokenize.py --vqgan tiny --images 6 --batch_size 2 --target_size 64   # plumbing only

Builds, in a temp dir, a bundle whose VQGAN has Chameleon's real architecture (ch 128, ch_mult 1,1,2,2,4,
2 res blocks, z/embed dim 256, 8192 codes; seeded random weights, bundle format) with the tiny bundle's
text tokenizer, and ``--images`` JPEG photos-sized noise images (``--image_px`` square, so every item
gets the target_size x target_size crop). Then, on the same machine and in this one run:

  bare batched     the preprocessed tensors, ``--batch_size`` per ``VQGAN.encode`` call (as loaded:
                   channels_last with the fast path on CPU);
  bare per-image   the same tensors one image per call (what pre_tokenize --vq_channels_last does on CPU:
                   batch-invariant; pre_tokenize's default is now the NCHW modules, Lumina's codes);
  bare per-image, modules (before)   the same through the taming modules, as before model/tokenizer/vqgan_fast.py;
  lumina loop      ``LuminaLoop`` below: Lumina-mGPT's pre_tokenize loop rewritten here faithfully (its
                   preprocessing, its NCHW model and VQGAN call order, a .pkl per item);
  pre_tokenize     the real script in a subprocess (``--num_workers``, ``--batch_size``), rate read off
                   its record file as it grows; with ``--batched_pipeline`` once more with
                   ``--no_batch_invariant`` (whole batches), and with ``--ablations`` once more with
                   ``--no_reuse_freed_memory``.

On CUDA every method encodes in strict float32 (no TF32 convolutions or matmuls), Lumina's loop included:
our VQGAN.encode does (TF32 moves codes near ties), and a loop left at PyTorch's TF32 cuDNN default would
be compared at another precision. ``--images`` must be at least 3 x ``--batch_size`` (the first batch is
a warm-up).

The in-process methods run with glibc's default malloc, as Lumina's loop does (``--reuse_freed_memory``
gives all of them pre_tokenize's setting instead); the pre_tokenize runs are the script as shipped.

``--like_for_like`` (alone, without the in-process methods) compares whole processes started the same way,
one after the other in alternating order (``--repeats`` times), each timed from its own output files as
they appear, first batch excluded:

  lumina process   Lumina's loop (``LuminaLoop``) in a fresh process of its own, one process, glibc's
                   default malloc: how Lumina's pre_tokenize.py runs;
  ours, like for like   pre_tokenize.py with ``--num_workers 0 --no_reuse_freed_memory``: one process,
                   default malloc, the default NCHW VQGAN;
  ours as shipped  pre_tokenize.py with its defaults (``--num_workers``, ``--reuse_freed_memory`` on CPU);
  ours as shipped + --vq_channels_last   the same with the channels_last fast path (codes may differ).

Rates are steady state: the first batch of each method is excluded (oneDNN primitive creation, model
loading, worker start-up). The in-process methods run interleaved, batch by batch in rotating order, so
that other jobs on a shared machine slow them alike; their CPU seconds per image (this process, all
threads) are reported too, and the load average. The codes are compared: Lumina's loop vs ours, the fast
path vs the modules, batched vs per-image (counts of differing codes). ``--profile`` first runs one image
through each encoder under torch.profiler (self CPU time by op) and oneDNN's verbose log (primitives,
reorders), which is what explains the differences.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from data.image_preprocess import crop_sizes
from data.item_processor import ItemProcessor
from model.tokenizer.tiny_bundle import make_tiny_bundle
from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.vqgan import VQGAN, VQGANConfig, load_vqgan, precise_cuda
from model.tokenizer.vqgan_fast import reuse_freed_memory

logger = logging.getLogger("bench_pretokenize")
REPO = Path(__file__).resolve().parents[1]

REAL_WIDTH_VQGAN = VQGANConfig(embed_dim=256, n_embed=8192, z_channels=256, resolution=512, in_channels=3,
                               out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                               attn_resolutions=(), dropout=0.0, double_z=False)


def make_bundle(out: Path, seed: int = 0) -> Path:
    make_tiny_bundle(out, seed=seed)
    torch.manual_seed(seed)
    model = VQGAN(REAL_WIDTH_VQGAN).eval()
    (out / "vqgan.yaml").write_text(yaml.safe_dump(REAL_WIDTH_VQGAN.to_yaml_dict(), sort_keys=False))
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}}, buf)
    (out / "vqgan.ckpt").write_bytes(buf.getvalue())
    return out


def make_images(d: Path, n: int, px: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        # smooth noise compresses like a photo rather than like white noise
        small = rng.integers(0, 256, (px // 8, px // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((px, px), Image.Resampling.BICUBIC).save(d / f"{i:04d}.jpg", quality=90)
        items.append({"conversations": [{"from": "human", "value": f"<|image|> Describe picture {i}."},
                                        {"from": "gpt", "value": f"A smooth noise picture, number {i}."}],
                      "image": [f"{i:04d}.jpg"]})
    path = d / "data.json"
    path.write_text(json.dumps(items))
    return path


POLL_S = 0.02  # how often a child's output files are read to see which images are done


def rate(times: list[float], warmup: int) -> float:
    """images/s between the end of image ``warmup`` and the end of the last image; ``times[i]`` is when
    image i was done (images of one batch share a time, so the warmup is moved to a batch boundary).
    Images are seen done at polls ``POLL_S`` apart: when all of them after the warm-up were seen at one poll,
    they took at most ``POLL_S``, and the rate given is that lower bound (a tiny run; not a figure to quote)."""
    while warmup < len(times) - 1 and times[warmup] == times[warmup - 1]:
        warmup += 1
    return (len(times) - warmup) / max(times[-1] - times[warmup - 1], POLL_S)


def bare_batched(tok: ChameleonTokenizer, x: torch.Tensor) -> torch.Tensor:
    return tok.vqgan.encode(x).cpu()


def bare_per_image(tok: ChameleonTokenizer, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
    tok.vqgan.fast_encode = fast
    try:
        return torch.cat([tok.vqgan.encode(x[i:i + 1]).cpu() for i in range(x.shape[0])])
    finally:
        tok.vqgan.fast_encode = True


class LuminaLoop:
    """A faithful copy (written here, not imported) of Lumina-mGPT's pre_tokenize.py loop on its
    original-Chameleon image path (``FlexARItemProcessor.process_image`` with ``chameleon_vae_ori``):

    per item: open the image, ``var_center_crop`` (crop list walk, BOX halving, BICUBIC cover, random
    crop offset), ``ImageTokenizer.img_tokens_from_pil`` (whiten transparency, ``np.array / 255 * 2 - 1``
    in float64, ``permute(2, 0, 1).to(conv_in.weight)``, which keeps the HWC strides: a channels_last-
    strided float32 input, ``unsqueeze(0)``), ``VQModel.encode`` on the NCHW model as loaded (encoder,
    quant_conv, ``VectorQuantizer2.forward``: distances, argmin, z_q, the two loss means, straight-through
    z_q), codes -> BPE ids through a mapping tensor, the new-line column by ``torch.cat``, ``.tolist()``,
    the image-block list; text turns encoded one by one; then ``pickle.dump`` of the item to its own file.
    """

    def __init__(self, tok: ChameleonTokenizer, vq: VQGAN, target_size: int, beta: float = 0.25):
        self.tok, self.vq, self.beta = tok, vq, beta
        # Lumina's generate_crop_size_list((target_size // 32) ** 2, 32): the same boundary walk as ours
        self.crop_size_list = crop_sizes(target_size)
        self.img2bpe = tok.codes_to_bpe(torch.arange(vq.config.n_embed))
        self.rng = random.Random(0)

    def var_center_crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        rem = [min(cw / w, ch / h) / max(cw / w, ch / h) for cw, ch in self.crop_size_list]
        crop = sorted(zip(rem, self.crop_size_list), reverse=True)[0][1]
        while img.size[0] >= 2 * crop[0] and img.size[1] >= 2 * crop[1]:
            img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
        scale = max(crop[0] / img.size[0], crop[1] / img.size[1])
        img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
        left, upper = self.rng.randint(0, img.size[0] - crop[0]), self.rng.randint(0, img.size[1] - crop[1])
        return img.crop((left, upper, left + crop[0], upper + crop[1]))

    @staticmethod
    def whiten_transparency(img: Image.Image) -> Image.Image:
        if img.mode == "RGB":
            return img
        rgba = np.array(img.convert("RGBA"))
        if not (rgba[:, :, 3] < 255).any():
            return img.convert("RGB")
        a = rgba[:, :, 3] / 255.0
        return Image.fromarray(((1 - a[:, :, None]) * 255 + a[:, :, None] * rgba[:, :, :3]).astype("uint8"), "RGB")

    def vq_encode(self, img: torch.Tensor) -> torch.Tensor:
        # On CUDA, the same arithmetic as ours (VQGAN.encode): strict float32 convolutions and matmuls, no
        # TF32. Lumina's own loop would run TF32 convolutions (PyTorch's cuDNN default), which is faster and
        # moves codes near ties: a comparison across precisions would measure TF32, not the loop.
        with precise_cuda(img.device):
            return self._vq_encode(img)

    def _vq_encode(self, img: torch.Tensor) -> torch.Tensor:
        vq = self.vq
        z = vq.quant_conv(vq.encoder(img))
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, vq.config.embed_dim)
        emb = vq.quantize.embedding.weight
        d = torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(emb ** 2, dim=1) \
            - 2 * torch.einsum("bd,dn->bn", flat, emb.transpose(0, 1))
        idx = torch.argmin(d, dim=1)
        z_q = vq.quantize.embedding(idx).view(z.shape)
        _loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
        return idx

    @torch.no_grad()
    def process_image(self, path: Path) -> list[int]:
        image = self.var_center_crop(Image.open(path))
        w_grids, h_grids = image.size[0] // 32, image.size[1] // 32
        np_img = np.array(self.whiten_transparency(image)) / 255.0
        np_img = np_img * 2 - 1
        img = torch.from_numpy(np_img).permute(2, 0, 1).to(self.vq.encoder.conv_in.weight).unsqueeze(0)
        toks = self.img2bpe.to(img.device)[self.vq_encode(img)].view(-1)
        full = toks.reshape(image.size[1] // 16, image.size[0] // 16)
        nl = self.tok.token_id("<reserved08799>")
        full = torch.cat((full, torch.ones(image.size[1] // 16, 1, device=full.device, dtype=full.dtype) * nl),
                         dim=1).flatten()
        return [self.tok.token_id("<racm3:break>"), self.tok.size_token_id(h_grids),
                self.tok.size_token_id(w_grids), *full.tolist(), self.tok.token_id("<eoss>")]

    def process_item(self, item: dict, base: Path) -> tuple[list[int], list[int], list[list[int]]]:
        tokens, labels, blocks = [self.tok.bos_id], [-100], []
        images = iter(item["image"])
        for k, msg in enumerate(item["conversations"]):
            for j, part in enumerate(msg["value"].split("<|image|>")):
                if j:
                    blocks.append(self.process_image(base / next(images)))
                    tokens += blocks[-1]
                    labels += blocks[-1] if k % 2 else [-100] * len(blocks[-1])
                ids = self.tok.encode_text(part)
                tokens += ids
                labels += ids if k % 2 else [-100] * len(ids)
            tokens.append(self.tok.eot_id)
            labels.append(self.tok.eot_id if k % 2 else -100)
        return tokens, labels, blocks

    def run(self, items: list[dict], first_id: int, base: Path, out: Path) -> list[list[int]]:
        """Lumina's pre_tokenize.py loop body; returns the image blocks (to compare codes)."""
        blocks = []
        for k, item in enumerate(items):
            tokens, labels, b = self.process_item(item, base)
            blocks += b
            with open(out / f"{first_id + k}.pkl", "wb") as f:
                pickle.dump({"token": tokens, "label": labels, "id": first_id + k}, f)
        return blocks


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(methods: dict, rounds: int, device: torch.device) -> tuple[dict, dict, dict]:
    """Runs every method on round k's images before any method on round k+1 (rotating the order), so
    that a change in the machine's load hits all methods alike; round 0 warms up and is not counted.
    Returns wall seconds, CPU seconds (this process, all threads) and each method's outputs by round."""
    spent = {name: 0.0 for name in methods}
    cpu = {name: 0.0 for name in methods}
    outputs: dict[str, list] = {name: [] for name in methods}
    names = list(methods)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            t0, c0 = time.perf_counter(), cpu_seconds()
            outputs[name].append(methods[name](k))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k:
                spent[name] += time.perf_counter() - t0
                cpu[name] += cpu_seconds() - c0
        logger.info("round %d/%d done; load average %.2f", k + 1, rounds, os.getloadavg()[0])
    return spent, cpu, outputs


def onednn_calls(fn) -> dict[str, dict]:
    """Runs ``fn`` with oneDNN's verbose log on (fd 1 redirected to a file) and sums the executed
    primitives by kind and implementation: {"convolution brg_conv_fwd:avx2": {"n": 30, "ms": 612.0}}."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryFile(mode="w+") as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        for line in f:
            p = line.strip().split(",")
            if len(p) > 7 and p[0] == "onednn_verbose" and p[3] == "exec":
                e = out.setdefault(f"{p[5]} {p[6]}", {"n": 0, "ms": 0.0})
                e["n"] += 1
                e["ms"] += float(p[-1])
    return out


def profile_encoders(variants: dict, top: int = 8) -> dict:
    """Self CPU time by op (torch.profiler) and oneDNN primitives of one call of each variant, after a
    warm-up call; what explains the differences between the encoders (bench/RESULTS.md)."""
    from torch.profiler import ProfilerActivity, profile

    report = {}
    for name, fn in variants.items():
        fn()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops: dict[str, float] = {}
        for e in prof.key_averages():
            ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e3
        total = sum(ops.values())
        report[name] = {"wall_s": wall, "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                        "sys_s": r1.ru_stime - r0.ru_stime, "page_faults": r1.ru_minflt - r0.ru_minflt,
                        "self_cpu_ms_total": total, "top_ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top]),
                        "onednn": onednn_calls(fn)}
        logger.info("profile %s: wall %.2f s, CPU %.2f s (system %.2f s), %d page faults; profiler: %.0f ms "
                    "self CPU; %s", name, wall, report[name]["cpu_s"], report[name]["sys_s"],
                    report[name]["page_faults"], total,
                    ", ".join(f"{k} {v:.0f}" for k, v in report[name]["top_ops_ms"].items()))
        for k, v in sorted(report[name]["onednn"].items()):
            logger.info("   oneDNN %-36s n=%-3d %.0f ms", k, v["n"], v["ms"])
    return report


def bench_script(data: Path, bundle: Path, out: Path, args, *extra: str) -> tuple[list[float], str, str]:
    cmd = [sys.executable, "pre_tokenize/pre_tokenize.py", "--in_filename", str(data), "--out_dir", str(out),
           "--tokenizer_dir", str(bundle), "--target_size", str(args.target_size), "--batch_size",
           str(args.batch_size), "--num_workers", str(args.num_workers), "--device", args.device, "--commit_items", "1",
           "--threads", str(args.threads), "--no_progress", *extra]
    rec = out / "0-of-1-record.jsonl"
    p = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen: list[float] = []
    while p.poll() is None:
        n = rec.read_bytes().count(b"\n") if rec.exists() else 0
        seen += [time.perf_counter()] * (n - len(seen))
        time.sleep(POLL_S)
    n = rec.read_bytes().count(b"\n")
    seen += [time.perf_counter()] * (n - len(seen))
    log = p.stderr.read()
    if p.returncode:
        raise RuntimeError(f"pre_tokenize failed:\n{log}")
    return seen, " ".join(cmd[1:]), log


def timed_process(cmd: list[str], count, env: dict | None = None) -> list[float]:
    """Runs ``cmd`` (from the repository root); ``count()`` is how many images are done so far (read off
    its output files); returns when each image was seen done."""
    p = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    seen: list[float] = []
    while p.poll() is None:
        seen += [time.perf_counter()] * (count() - len(seen))
        time.sleep(POLL_S)
    seen += [time.perf_counter()] * (count() - len(seen))
    log = p.stderr.read()
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log}")
    return seen


def lumina_process(data: Path, bundle: Path, out: Path, target_size: int, threads: int) -> None:
    """``--lumina_process``: Lumina's loop over every item of ``data``, alone in this process."""
    if threads:
        torch.set_num_threads(threads)
    tok = ChameleonTokenizer.from_bundle(bundle, load_vqgan=False)
    loop = LuminaLoop(tok, load_vqgan(bundle / "vqgan.yaml", bundle / "vqgan.ckpt", channels_last=False),
                      target_size)
    out.mkdir(parents=True, exist_ok=True)
    loop.run(json.loads(data.read_text()), 0, data.parent, out)


def like_for_like(data: Path, bundle: Path, tmp: Path, args) -> dict:
    """Whole processes, alternating (see the module docstring); images/s per method and repeat."""
    runs = {
        "lumina process (one process, default malloc)": lambda out: timed_process(
            [sys.executable, "bench/bench_pretokenize.py", "--lumina_process", str(data), str(bundle), str(out),
             "--target_size", str(args.target_size), "--threads", str(args.threads)],
            lambda: len(list(out.glob("*.pkl"))) if out.exists() else 0),
        "ours, like for like (pre_tokenize.py --num_workers 0 --no_reuse_freed_memory)":
            lambda out: bench_script(data, bundle, out, args, "--num_workers", "0", "--no_reuse_freed_memory")[0],
        f"ours as shipped (pre_tokenize.py, --num_workers {args.num_workers}, reuse_freed_memory on)":
            lambda out: bench_script(data, bundle, out, args)[0],
        "ours as shipped + --vq_channels_last (fast path)":
            lambda out: bench_script(data, bundle, out, args, "--vq_channels_last")[0],
    }
    names = list(runs)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    n_images = len(json.loads(data.read_text()))
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            out = tmp / f"lfl_{names.index(name)}_{rep}"
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            rates[name].append(rate(runs[name](out), args.batch_size))
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and the workers it waited for
            cpu[name].append((c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / n_images)
            loads.append(os.getloadavg()[0])
            logger.info("%s: %.3f images/s, %.2f CPU s/image (load %.2f)", name, rates[name][-1], cpu[name][-1],
                        loads[-1])
    base, base_cpu = rates[names[0]], cpu[names[0]]
    print(f"\nlike for like: {args.repeats} repeat(s), alternating order; load average {min(loads):.1f}-{max(loads):.1f}")
    print("| method | images/s per repeat | vs Lumina process | CPU s / image, all its processes, start-up "
          "included | vs Lumina process (CPU) |\n|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {' / '.join(f'{r:.3f}' for r in rates[name])} | "
              f"{' / '.join(f'{r / b:.2f}x' for r, b in zip(rates[name], base))} | "
              f"{' / '.join(f'{c:.2f}' for c in cpu[name])} | "
              f"{' / '.join(f'{b / c:.2f}x' for c, b in zip(cpu[name], base_cpu))} |")
    return {"rates": rates, "cpu_s_per_image": cpu, "load_average": loads}


def count_differing(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, int]:
    return sum(int((np.asarray(x) != np.asarray(y)).sum()) for x, y in zip(a, b)), sum(np.asarray(x).size for x in a)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked (bench/gpu_check.py's sizes must pass these checks too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="number of images (one per item)")
    parser.add_argument("--image_px", type=int, default=384, help="side of the square JPEG inputs")
    parser.add_argument("--target_size", type=int, default=256, help="pre_tokenize --target_size")
    parser.add_argument("--batch_size", type=int, default=8, help="VQGAN batch for bare batched and pre_tokenize")
    parser.add_argument("--num_workers", type=int, default=1, help="pre_tokenize --num_workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every method (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N for the GPU comparison (batched "
                        "encode and pre_tokenize.py vs the per-item loop on the same GPU); refused without CUDA")
    parser.add_argument("--vqgan", choices=["real", "tiny"], default="real",
                        help="real: Chameleon's VQGAN architecture (the figures); tiny: the tiny bundle's, for a "
                             "quick run of the plumbing (bench/gpu_check.py --rehearse-cpu)")
    parser.add_argument("--batched_pipeline", action="store_true",
                        help="also run pre_tokenize with --no_batch_invariant (whole batches per VQGAN call)")
    parser.add_argument("--ablations", action="store_true",
                        help="also run pre_tokenize with --no_reuse_freed_memory (glibc returns freed memory)")
    parser.add_argument("--reuse_freed_memory", action="store_true",
                        help="apply pre_tokenize's reuse_freed_memory (glibc mallopt) to this process too, so the "
                             "in-process methods (Lumina's loop included) all run with it")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the interleaved methods and pre_tokenize this many times (figures per repeat)")
    parser.add_argument("--profile", action="store_true",
                        help="first profile one image through each encoder (torch.profiler + oneDNN verbose, "
                        "CPU and system time, page faults)")
    parser.add_argument("--profile_only", action="store_true", help="--profile, then stop")
    parser.add_argument("--like_for_like", action="store_true",
                        help="only compare whole processes started alike: Lumina's loop in its own process vs "
                             "pre_tokenize.py with one process and default malloc, and as shipped")
    parser.add_argument("--lumina_process", nargs=3, type=Path, metavar=("DATA", "BUNDLE", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pretokenize.json",
                        help="where to write the results as JSON")
    args = parser.parse_args(argv)
    if args.images < 3 * args.batch_size:
        parser.error("--images must be at least 3 * --batch_size (the first batch is a warm-up)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False (no GPU or a CPU-only torch "
                     f"build); run without --device for the CPU comparison")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.lumina_process:  # the like-for-like mode's own process for Lumina's loop
        lumina_process(*args.lumina_process, args.target_size, args.threads)
        return
    device = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reuse_freed_memory and not reuse_freed_memory():
        print("bench_pretokenize.py: --reuse_freed_memory: glibc's mallopt is not available here", file=sys.stderr)
        sys.exit(2)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp / "bundle") if args.vqgan == "real" else make_tiny_bundle(tmp / "bundle", seed=0)
        data = make_images(tmp, args.images, args.image_px)
        if args.like_for_like:
            report = {"args": {k: str(v) for k, v in vars(args).items()}, "like_for_like": like_for_like(
                data, bundle, tmp, args)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            return
        items = json.loads(data.read_text())
        # the bare methods measure the channels_last fast path (pre_tokenize.py --vq_channels_last on CPU)
        tok = ChameleonTokenizer.from_bundle(bundle, device=device, channels_last=device.type == "cpu")
        # Lumina loads the VQGAN as it is (NCHW parameters), with its own loop around it.
        lumina = LuminaLoop(tok, load_vqgan(bundle / "vqgan.yaml", bundle / "vqgan.ckpt", device=device,
                                            channels_last=False), args.target_size)
        proc = ItemProcessor(tok, args.target_size)
        pixels = [im for it in items for im in proc.prepare(it, tmp).images]
        logger.info("%d images preprocessed to %s; torch %s, %d threads, device %s, channels_last=%s",
                    len(pixels), pixels[0].shape, torch.__version__, torch.get_num_threads(), device,
                    tok.vqgan.channels_last)
        (tmp / "lumina").mkdir()
        b = args.batch_size
        x = torch.from_numpy(np.stack(pixels))
        report = {"args": {k: str(v) for k, v in vars(args).items()},
                  "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        if args.profile or args.profile_only:
            with torch.no_grad():
                x0 = x[:1]
                report["profile"] = profile_encoders({
                    "ours (fast path)": lambda: tok.vqgan.encode(x0),
                    "ours before (modules, channels_last)": lambda: bare_per_image(tok, x0, fast=False),
                    "lumina (NCHW model, channels_last-strided input)":
                        lambda: lumina.process_image(tmp / items[0]["image"][0])})
        if args.profile_only:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            return
        methods = {"bare batched": lambda k: bare_batched(tok, x[k * b:(k + 1) * b]),
                   "bare per-image": lambda k: bare_per_image(tok, x[k * b:(k + 1) * b]),
                   "bare per-image, modules (before)": lambda k: bare_per_image(tok, x[k * b:(k + 1) * b], False),
                   "lumina loop": lambda k: lumina.run(items[k * b:(k + 1) * b], k * b, tmp, tmp / "lumina")}
        if device.type == "cuda":  # the fast path is CPU-only; per-image is pre_tokenize's CPU default
            del methods["bare per-image, modules (before)"]
        rounds = len(items) // b
        counted = (rounds - 1) * b
        report["repeats"] = []
        for rep in range(args.repeats):
            load = {"before": os.getloadavg()[0]}
            spent, cpu, outputs = interleaved(methods, rounds, device)
            load["after in-process methods"] = os.getloadavg()[0]
            results = {name: {"images_per_s": counted / spent[name], "seconds": spent[name],
                              "cpu_s_per_image": cpu[name] / counted} for name in methods}
            per_image = [c.numpy() for r in outputs["bare per-image"] for c in r]
            lumina_codes = [tok.parse_image_block(blk) for r in outputs["lumina loop"] for blk in r]
            codes = {"lumina loop vs ours": count_differing(lumina_codes, per_image),
                     "bare batched vs per-image": count_differing([c.numpy() for r in outputs["bare batched"]
                                                                   for c in r], per_image)}
            if "bare per-image, modules (before)" in outputs:
                codes["fast path vs modules"] = count_differing(
                    [c.numpy() for r in outputs["bare per-image, modules (before)"] for c in r], per_image)
            runs = [("pre_tokenize", ())] + ([("pre_tokenize --no_batch_invariant", ("--no_batch_invariant",))]
                                             if args.batched_pipeline else []) \
                + ([("pre_tokenize --no_reuse_freed_memory", ("--no_reuse_freed_memory",))] if args.ablations else [])
            for name, extra in runs:
                t0 = time.perf_counter()
                times, cmd, log = bench_script(data, bundle, tmp / f"{name.replace(' ', '_')}_{rep}", args, *extra)
                results[name] = {"images_per_s": rate(times, b), "seconds": time.perf_counter() - t0,
                                 "command": cmd, "summary": log.strip().splitlines()[-1]}
                load[f"after {name}"] = os.getloadavg()[0]
            base = results["lumina loop"]["images_per_s"]
            rep_report = {"load_average": load, "results": results, "codes_differing": codes,
                          "vs_lumina_loop": {n: r["images_per_s"] / base for n, r in results.items()}}
            report["repeats"].append(rep_report)
            print(f"\nrepeat {rep + 1}/{args.repeats}, load average {load}")
            print("| method | images/s (steady) | vs Lumina loop | CPU s / image (this process) |\n|---|---|---|---|")
            for name, r in results.items():
                c = f"{r['cpu_s_per_image']:.2f}" if "cpu_s_per_image" in r else "-"
                print(f"| {name} | {r['images_per_s']:.3f} | {r['images_per_s'] / base:.2f}x | {c} |")
            for name, (n, total) in codes.items():
                print(f"codes differing, {name}: {n} of {total}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

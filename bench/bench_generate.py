r"""Image-token throughput of model/generation/generator.py against the two ways Lumina-mGPT-style CFG decoding is run.

    python bench/bench_generate.py                                  # defaults below, ~3 minutes on 1 CPU core
    python bench/bench_generate.py --hidden 256 --layers 4 --heads 8 --resolution 256x256 --reps 3 \
        --batch_sizes 1,2,4,8 --threads 1

Same tiny-but-not-trivial model (made by model/make_tiny_model.py on the tiny bundle), same prompt, same
decoding rules (cfg 4, image top-k 2000, temperature 1, sizes given), measured side by side in one process,
repetitions interleaved (ours, a, b, ours, a, b, ...), medians reported:

- ours: ``Generator.decode``: conditional and unconditional rows in ONE batched forward per token, KV cache.
- (a) transformers' ``generate`` on ``ChameleonForConditionalGeneration`` with Lumina-style logits processors
  (CFG that runs the unconditional sequence as a second, unbatched forward with its own cache, as Lumina's
  ``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor``; the image-block constraints;
  interleaved top-k). transformers' Chameleon sets every image-code logit to the float minimum in forward
  (it cannot generate images); that line is disabled here (``vocabulary_mapping.image_tokens = []``).
- (b) a Lumina-style hand loop: the conditional forward with a KV cache, the same processors (so the
  second forward for the unconditional row), top-k, multinomial sampling; no ``generate`` machinery.

Every method starts from the prompt with ``<racm3:break>`` and both size tokens appended and generates the
rest of the block (codes, row ends, ``<eoss>``); "image tokens/s" counts those tokens. Then ours alone at
several batch sizes (each sample with its CFG row): tokens/s summed over the batch.

``--compile`` adds ``Generator(..., compile=True)`` (static KV cache, torch.compile'd decode step;
model/generation/compiled.py) as a fourth method, interleaved with the others, and as a column of the batch
table. Its compilation (one per batch size) happens in the warm-up, is printed on its own, and is not in
the steady-state figures. "s/image" is the seconds one sample's image block takes at that rate.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import ChameleonForConditionalGeneration, DynamicCache, GenerationConfig
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from model.generation.generator import DecodeSettings, Generator, Request, block_len
from model.tokenizer.tiny_bundle import make_tiny_bundle
from model.make_tiny_model import make_tiny_model


# ----------------------------------------------------------------------------------------------------------
# Lumina-style processors (unbatched: one sequence; the CFG one runs its own forward)


class UnbatchedCFG(LogitsProcessor):
    """Inside an image block, once both size tokens are in: uncond + cfg * (cond - uncond), the unconditional
    logits from a separate forward of the sequence from <racm3:break> on, with its own KV cache."""

    def __init__(self, model, cfg: float, boi: int, eoi: int):
        self.model, self.cfg, self.boi, self.eoi = model, cfg, boi, eoi
        self.cache = None
        self.fed = 0

    def __call__(self, input_ids, scores):
        seq = input_ids[0]
        if int((seq == self.boi).sum()) != int((seq == self.eoi).sum()) + 1:
            self.cache, self.fed = None, 0
            return scores
        start = int(torch.where(seq == self.boi)[0][-1])
        if len(seq) - start - 1 < 2 or self.cfg == 1.0:
            return scores
        if self.cache is None:
            self.cache, self.fed = DynamicCache(config=self.model.config), start
        new = input_ids[:, self.fed:]
        mask = torch.ones(1, len(seq) - start, dtype=torch.long, device=seq.device)
        out = self.model(new, attention_mask=mask, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.fed = len(seq)
        unc = out.logits[:, -1].float()
        return self.cfg * (scores - unc) + unc


class ImageBlockConstraints(LogitsProcessor):
    """Codes only inside the block; <reserved08799> at each row end, <eoss> after the last row."""

    def __init__(self, specials, vocab_size: int):
        self.sp = specials
        self.suppress = None
        self.codes = specials.code_mask[:vocab_size]

    def __call__(self, input_ids, scores):
        seq, sp = input_ids[0], self.sp
        if int((seq == sp.boi).sum()) != int((seq == sp.eoi).sum()) + 1:
            return scores
        start = int(torch.where(seq == sp.boi)[0][-1])
        if len(seq) - start - 1 < 2:
            return scores
        h, w = 2 * sp.size_of[int(seq[start + 1])], 2 * sp.size_of[int(seq[start + 2])]
        k = len(seq) - start - 3
        if (k + 1) % (w + 1) == 0 or k + 1 == (w + 1) * h + 1:
            forced = torch.full_like(scores, -math.inf)
            forced[:, sp.eol if (k + 1) % (w + 1) == 0 else sp.eoi] = 0
            return forced
        if self.suppress is None or self.suppress.device != scores.device:
            self.suppress = ~self.codes.to(scores.device)
        return torch.where(self.suppress, -math.inf, scores)


class InterleavedTopK(LogitsProcessor):
    def __init__(self, image_k: int, text_k: int, boi: int, eoi: int):
        self.image_k, self.text_k, self.boi, self.eoi = image_k, text_k, boi, eoi

    def __call__(self, input_ids, scores):
        seq = input_ids[0]
        k = self.image_k if int((seq == self.boi).sum()) == int((seq == self.eoi).sum()) + 1 else self.text_k
        k = min(k, scores.shape[-1])
        return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)


def processors(hf, specials, cfg: float) -> LogitsProcessorList:
    return LogitsProcessorList([UnbatchedCFG(hf, cfg, specials.boi, specials.eoi),
                                ImageBlockConstraints(specials, hf.config.vocab_size),
                                InterleavedTopK(2000, 10, specials.boi, specials.eoi)])


# ----------------------------------------------------------------------------------------------------------
# the three methods: each returns the number of new tokens


def run_ours(gen: Generator, prompt: list[int], n_new: int, cfg: float, batch: int = 1) -> int:
    reqs = [Request(prompt, 0, k) for k in range(batch)]
    outs = gen.decode(reqs, DecodeSettings(cfg=cfg, max_new_tokens=n_new, seed=0))
    assert all(len(o.tokens) == n_new and o.tokens[-1] == gen.specials.eoi for o in outs)
    return sum(len(o.tokens) for o in outs)


def run_hf_generate(hf, specials, prompt: list[int], n_new: int, cfg: float) -> int:
    ids = torch.tensor([prompt], device=hf.device)
    gc = GenerationConfig(max_new_tokens=n_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          eos_token_id=[specials.eot], pad_token_id=specials.pad)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                          logits_processor=processors(hf, specials, cfg))
    new = out[0, len(prompt):].tolist()
    assert len(new) == n_new and new[-1] == specials.eoi, (len(new), new[-3:])
    return len(new)


def run_lumina_loop(hf, specials, prompt: list[int], n_new: int, cfg: float) -> int:
    procs = processors(hf, specials, cfg)
    seq = torch.tensor([prompt], device=hf.device)
    cache = DynamicCache(config=hf.config)
    new_ids = seq
    with torch.no_grad():
        for _ in range(n_new):
            out = hf(new_ids, attention_mask=torch.ones_like(seq), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
            scores = procs(seq, out.logits[:, -1].float())
            tok = torch.multinomial(scores.softmax(-1), 1)
            seq = torch.cat([seq, tok], dim=1)
            new_ids = tok
    assert int(seq[0, -1]) == specials.eoi
    return n_new


# ----------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(f, device: str) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds of this process) of one call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    n = f()
    sync(device)
    return n, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--resolution", default="256x256", help="WxH of the generated image")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per method")
    p.add_argument("--batch_sizes", default="1,2,4,8", help="batch sizes for ours (scaling)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the same code on a GPU)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="weights' dtype (bf16 on GPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure Generator(compile=True): static KV cache + compiled decode step")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        measure(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(a, tmp: Path) -> None:
    w, h = (int(x) for x in a.resolution.split("x"))
    bundle = make_tiny_bundle(tmp / "bundle", seed=0)
    model_dir = make_tiny_model(bundle, tmp / "model", hidden_size=a.hidden, num_layers=a.layers,
                                num_heads=a.heads, seed=0)
    gen = Generator.from_pretrained(model_dir, bundle, device=a.device, precision=a.precision)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    hf = ChameleonForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(a.device).eval()
    hf.model.vocabulary_mapping.image_tokens = []  # transformers masks image codes in forward; undo for (a), (b)
    sp = gen.specials
    prompt = gen.image_requests(["a red bicycle leaning on a brick wall"], (w, h))[0].tokens
    prompt = prompt + [sp.boi, sp.size_id[h // 32], sp.size_id[w // 32]]
    n_new = block_len(h // 32, w // 32) - 3
    n_params = sum(p.numel() for p in gen.lm.parameters())
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads, {n_params / 1e6:.1f}M parameters, vocab "
          f"{gen.config.vocab_size}; prompt {len(prompt)} tokens, {n_new} image tokens per sample ({w}x{h}); "
          f"cfg {a.cfg}; {a.device} {a.precision}, torch threads {a.threads}")

    genc = Generator(gen.lm, gen.tokenizer, device=a.device, compile=True) if a.compile else None
    methods = {"ours (batched CFG, 1 forward/token)": lambda: run_ours(gen, prompt, n_new, a.cfg),
               "(a) transformers generate + Lumina processors": lambda: run_hf_generate(hf, sp, prompt, n_new, a.cfg),
               "(b) Lumina-style loop, 2 forwards/token": lambda: run_lumina_loop(hf, sp, prompt, n_new, a.cfg)}
    if genc is not None:
        methods["ours --compile (static cache, compiled step)"] = lambda: run_ours(genc, prompt, n_new, a.cfg)
    for name, f in methods.items():  # warm-up (and, for --compile, compilation)
        t0 = time.perf_counter()
        f()
        if "compile" in name:
            print(f"--compile warm-up (compiling for 1 sample): {time.perf_counter() - t0:.1f} s, "
                  f"of it compiling {genc.compiled.compile_seconds:.1f} s"
                  + (f"; FAILED, eager: {genc.compiled.failed}" if genc.compiled.failed else ""))
    wall: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(a.reps):
        for name, f in methods.items():
            n, w_s, c_s = timed(f, a.device)
            wall[name].append(n / w_s)
            cpu[name].append(n / c_s)
    ours = "ours (batched CFG, 1 forward/token)"
    print(f"\nbatch 1 with CFG: image tokens per second of wall time and per second of this process's CPU time "
          f"(on a shared machine the CPU time is what the method itself costs); medians of {a.reps} interleaved runs")
    heads = ["ours"] + (["ours --compile"] if genc is not None else [])
    keys = [ours] + ([k for k in methods if "compile" in k] if genc is not None else [])
    # column order kept as before (bench/gpu_check.py reads cells 1 and 3); the --compile ratios and s/image after
    print("| method | tokens/s (wall) | tokens/CPU-s | "
          + " | ".join(f"{h} / method (wall) | {h} / method (CPU)" for h in heads) + " | s/image (wall) |")
    print("|---|---|---|" + "---|---|" * len(heads) + "---|")
    for name in methods:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        ratios = " | ".join(f"{statistics.median(wall[k]) / mw:.2f}x | {statistics.median(cpu[k]) / mc:.2f}x"
                            for k in keys)
        print(f"| {name} | {mw:.1f} (runs {', '.join(f'{x:.1f}' for x in wall[name])}) | {mc:.1f} (runs "
              f"{', '.join(f'{x:.1f}' for x in cpu[name])}) | {ratios} | {n_new / mw:.2f} |")

    sizes = [int(x) for x in a.batch_sizes.split(",")]
    variants = {"eager": gen} | ({"compiled": genc} if genc is not None else {})
    if genc is not None:
        for b in sizes:  # compile each batch size outside the timed runs
            c0 = genc.compiled.compile_seconds
            run_ours(genc, prompt, n_new, a.cfg, batch=b)
            print(f"--compile: batch {b} compiled in {genc.compiled.compile_seconds - c0:.1f} s")
    scale: dict[tuple[str, int], list[tuple[float, float]]] = {(v, b): [] for v in variants for b in sizes}
    for _ in range(a.reps):
        for b in sizes:
            for v, g in variants.items():
                n, w_s, c_s = timed(lambda: run_ours(g, prompt, n_new, a.cfg, batch=b), a.device)
                scale[(v, b)].append((n / w_s, n / c_s))
    b0 = sizes[0]
    print(f"\nours, scaling with batch size (CFG on: 2 rows per sample), all samples' image tokens, medians of "
          f"{a.reps} interleaved runs")
    cols = " | ".join(f"{v} tokens/s (wall) | {v} tokens/CPU-s | {v} vs batch {b0} (CPU)" for v in variants)
    print(f"| samples per batch | {cols} |" + (" compiled / eager (wall) | compiled / eager (CPU) |"
                                               if genc is not None else ""))
    print("|---|" + "---|---|---|" * len(variants) + ("---|---|" if genc is not None else ""))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in scale.items()}
    for b in sizes:
        cells = " | ".join(f"{med[(v, b)][0]:.1f} | {med[(v, b)][1]:.1f} | {med[(v, b)][1] / med[(v, b0)][1]:.2f}x"
                           for v in variants)
        extra = (f" {med[('compiled', b)][0] / med[('eager', b)][0]:.2f}x | "
                 f"{med[('compiled', b)][1] / med[('eager', b)][1]:.2f}x |" if genc is not None else "")
        print(f"| {b} | {cells} |{extra}")


if __name__ == "__main__":
    main()

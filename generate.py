r"""Generates images (classifier-free guidance) and text answers from a trained Chameleon / Lumina-mGPT model.

    # text-to-image: 4 samples per prompt at 512x512, Lumina's settings (cfg 4, image top-k 2000)
    python generate.py --model output/7B/epoch1/hf --tokenizer_dir ckpts/chameleon/tokenizer \
        --prompt "A red bicycle leaning on a brick wall" --resolution 512x512 --cfg 4.0 --n 4 --out samples/
    # answers to Lumina-format items (captioning, VQA; images in), ending with the human turn
    python generate.py --model output/7B/epoch1/hf --tokenizer_dir ckpts/chameleon/tokenizer \
        --conversations items.json --cfg 1.0 --out answers/
    # compiled decoding (static KV cache, torch.compile; CUDA graphs on a GPU), no progress bar (logs)
    python generate.py --model output/7B/epoch1/hf --tokenizer_dir ckpts/chameleon/tokenizer \
        --prompts_file prompts.txt --resolution 512x512 --n 4 --batch_size 8 --compile --no_progress --out samples/
    # straight from a training checkpoint, on the CPU, the tiny demo model (exps/demo.sh)
    python generate.py --model output/demo/train/epoch9 --tokenizer_dir output/demo/bundle \
        --prompts_file prompts.txt --resolution 128x128 --precision fp32 --device cpu --out output/demo/gen
    python generate.py -h

--model: an HF-format directory (ours, Lumina-mGPT's, Meta's converted: whatever --init_from loads) or one of
our training checkpoints epoch{E}[-iter{I}]/ (read with the safe loader resume uses). Decoding follows
Lumina-mGPT's rules (model/generation/generator.py); outputs (model/generation/samples.py): {out}/{i:05d}_{k}.png for prompt i,
sample k, {out}/generations.jsonl (prompt, text with <|image|> where an image stands, image files, token ids,
seed, all settings), {out}/contact_sheet.png. Bad input (a resolution off the 32-px grid or too large for
the context, a prompt too long, a bundle without its VQGAN, a conversation that already ends with an answer)
stops with a message naming it before any compute, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.generation.prompts import ItemPromptBuilder, read_conversations, read_prompts_file
from model.chameleon_lm import ModelLoadError
from model.training.checkpointing import CheckpointError
from model.training.flags import dataclass_parser, flag
from model.generation.generator import (DTYPES, T2I_TEMPLATE, DecodeSettings, GenerationInputError, Generator, load_lm,
                             read_model_config)
from model.generation.samples import (CONTACT_SHEET, GENERATIONS, image_name, parse_resolution, prompt_labels,
                                     write_contact_sheet, write_generations)
from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.vqgan import BundleError

logger = logging.getLogger("generate")


_f = flag


@dataclass
class GenerateArgs:
    """All flags of generate.py."""

    # what to load
    model: str | None = _f(None, "HF-format Chameleon dir (or hub id), or a training checkpoint epoch{E}[-iter{I}]/; "
                                 "required")
    tokenizer_dir: str | None = _f(None, "tokenizer bundle: text_tokenizer.json, vqgan.yaml, vqgan.ckpt; required")
    # what to generate
    prompt: list | None = _f(None, "a text-to-image prompt; repeat the flag for several", action="append")
    prompts_file: str | None = _f(None, "text-to-image prompts, one per line ('#' lines and blank lines skipped)")
    conversations: str | None = _f(None, "Lumina-format items (.json list or .jsonl) ending with the human turn or "
                                         "with {\"from\": \"gpt\", \"value\": null}: answers are generated; image "
                                         "paths resolve against the file's directory")
    resolution: str | None = _f(None, "WxH in pixels (multiples of 32): the prompt is wrapped in --template with "
                                      "this size and the size tokens are forced; without it the prompt is the human "
                                      "turn as written and the model chooses the size (as in Lumina)")
    template: str = _f(T2I_TEMPLATE.replace("\n", "\\n"),
                       "text-to-image template with {W}, {H}, {prompt} (Lumina's; '\\n' is a newline)")
    target_size: int = _f(512, "crop budget for images in --conversations, as in pre-tokenization (512/768/1024)")
    # decoding
    cfg: float | None = _f(None, "classifier-free guidance scale inside image blocks (1.0: off, and no unconditional "
                                 "rows are computed); default Lumina's: 4.0 for text-to-image prompts, 1.0 for "
                                 "--conversations")
    image_top_k: int = _f(2000, "top-k inside an image block")
    text_top_k: int = _f(10, "top-k outside image blocks")
    temperature: float = _f(1.0, "sampling temperature (after top-k)")
    top_p: float = _f(1.0, "nucleus sampling threshold after temperature (1.0: off)")
    greedy: bool = _f(False, "take the most likely token after the processors instead of sampling",
                      neg="--no_greedy")
    seed: int = _f(0, "sample k of prompt i draws from a generator seeded by (seed, i, k): reproducible, and the "
                      "same alone or in a batch")
    max_new_tokens: int | None = _f(None, "new tokens per sample (default: the whole image block for images, 512 for "
                                          "answers; never past max_position_embeddings)")
    n: int = _f(1, "samples per prompt / conversation")
    batch_size: int = _f(8, "samples decoded together (each also has an unconditional row when --cfg != 1)")
    # where
    precision: str = _f("auto", "weights' dtype: bf16 on CUDA, fp32 on CPU by default",
                        choices=["auto", "fp32", "tf32", "bf16", "fp16"])
    device: str | None = _f(None, "cuda, cuda:N or cpu (default: cuda if available)")
    compile: bool = _f(False, "decode with a static KV cache and a torch.compile'd decode step (CUDA graphs on a "
                              "GPU): compiles once per batch shape (its time is logged apart; Inductor's on-disk "
                              "cache makes the next run start fast), then each token costs less; same tokens as "
                              "without; falls back to eager with one warning where compiling cannot work",
                       neg="--no_compile")
    progress: bool = _f(True, "show a progress bar on stderr (samples done of all, tokens/s, ETA)",
                        neg="--no_progress")
    out: str | None = _f(None, "output directory (PNGs, generations.jsonl, contact_sheet.png); required")


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(GenerateArgs, __doc__)


def validate_args(a: GenerateArgs) -> list[str]:
    """Problems in the flags alone, each naming its flag."""
    bad = [f"--{name} is required" for name in ("model", "tokenizer_dir", "out") if not getattr(a, name)]
    sources = [s for s in ("prompt", "prompts_file", "conversations") if getattr(a, s)]
    if len(sources) != 1 and not (set(sources) == {"prompt", "prompts_file"}):
        bad.append("give prompts (--prompt and/or --prompts_file) or --conversations, not both and not neither")
    if a.resolution is not None:
        try:
            parse_resolution(a.resolution)
        except ValueError as e:
            bad.append(str(e))
        if a.conversations:
            bad.append("--resolution applies to text-to-image prompts, not to --conversations")
    for name in ("n", "batch_size", "image_top_k", "text_top_k", "target_size"):
        if getattr(a, name) < 1:
            bad.append(f"--{name} must be >= 1 (got {getattr(a, name)})")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        bad.append(f"--max_new_tokens must be >= 1 (got {a.max_new_tokens})")
    if a.cfg is None:
        a.cfg = 1.0 if a.conversations else 4.0
    if not a.cfg > 0:
        bad.append(f"--cfg must be > 0 (got {a.cfg})")
    if not a.temperature > 0:
        bad.append(f"--temperature must be > 0 (got {a.temperature})")
    if not 0 < a.top_p <= 1:
        bad.append(f"--top_p must be in (0, 1] (got {a.top_p})")
    if a.seed < 0:
        bad.append(f"--seed must be >= 0 (got {a.seed})")
    for name in ("prompts_file", "conversations"):
        if getattr(a, name) and not Path(getattr(a, name)).is_file():
            bad.append(f"--{name} {getattr(a, name)}: no such file")
    try:
        a.template.replace("\\n", "\n").format(W=1, H=1, prompt="")
    except (KeyError, IndexError, ValueError) as e:
        bad.append(f"--template {a.template!r}: only {{W}}, {{H}} and {{prompt}} can be filled in ({e})")
    return bad


def parse_args(argv: list[str] | None = None) -> GenerateArgs:
    parser = build_parser()
    a = GenerateArgs(**vars(parser.parse_args(argv)))
    problems = validate_args(a)
    if problems:
        parser.error("; ".join(problems))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = a.precision if a.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and precision in ("bf16", "fp16"):
        logger.warning("--precision %s on a CPU is slow; fp32 is the usual choice there", precision)
    if precision == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    settings = DecodeSettings(cfg=a.cfg, image_top_k=a.image_top_k, text_top_k=a.text_top_k,
                              temperature=a.temperature, top_p=a.top_p, greedy=a.greedy,
                              max_new_tokens=a.max_new_tokens, seed=a.seed)

    # everything that can be wrong with the input is found before the weights are loaded
    try:
        tokenizer = ChameleonTokenizer.from_bundle(a.tokenizer_dir, device=device)
        config = read_model_config(a.model)
        shell = _Shell(config)
        gen = Generator(shell, tokenizer, device=device,
                        prompt_builder=ItemPromptBuilder(tokenizer, target_size=a.target_size))
        if a.conversations:
            items = read_conversations(a.conversations)
            requests = gen.answer_requests(items, a.n, base_dir=Path(a.conversations).parent)
        else:
            prompts = list(a.prompt or []) + (read_prompts_file(a.prompts_file) if a.prompts_file else [])
            res = parse_resolution(a.resolution) if a.resolution else None
            if res is not None:
                gen.check_resolution(*res)  # grid and context, whatever the prompt
            requests = gen.image_requests(prompts, res, a.n, template=a.template.replace("\\n", "\n"))
    except (BundleError, ModelLoadError, GenerationInputError) as e:
        logger.error("%s", e)
        return 2

    try:
        lm = load_lm(a.model, device=device, dtype=DTYPES[precision])
    except (ModelLoadError, CheckpointError, OSError) as e:
        logger.error("--model %s: %s", a.model, e)
        return 2
    gen = Generator(lm, tokenizer, device=device, prompt_builder=gen.prompt_builder, compile=a.compile)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / GENERATIONS, out / CONTACT_SHEET):
        stale.unlink(missing_ok=True)
    record = {**dataclasses.asdict(settings), "model": a.model, "tokenizer_dir": a.tokenizer_dir,
              "resolution": a.resolution, "template": a.template if a.resolution else None, "n": a.n,
              "batch_size": a.batch_size, "precision": precision, "device": str(device)}
    logger.info("%d sample(s) from %d %s, %d per batch, on %s (%s)", len(requests),
                len({r.prompt_index for r in requests}), "conversation(s)" if a.conversations else "prompt(s)",
                a.batch_size, device, precision)
    paths, labels, t0, n_tokens = [], [], time.perf_counter(), 0
    bar = GenerationProgress(len(requests), enabled=a.progress)
    for s in range(0, len(requests), a.batch_size):
        gens = gen.run(requests[s:s + a.batch_size], settings, batch_size=a.batch_size, progress=bar.tokens,
                       pad_last=s > 0)
        bar.samples(len(gens))
        n_tokens += sum(len(g.tokens) for g in gens)
        paths += write_generations(gens, tokenizer, out, record)
        labels += prompt_labels(gens)
        for g in gens:
            bar.write(f"prompt {g.prompt_index} sample {g.sample_index} ({g.stop}): "
                      + (", ".join(image_name(g, j) for j in range(len(g.image_codes))) or repr(g.text[:200])))
    bar.close()
    dt = time.perf_counter() - t0
    if gen.compiled is not None and gen.compiled.compile_seconds:
        logger.info("of the %.1fs, compiling took %.1fs; decoding %.1f tokens/s after it", dt,
                    gen.compiled.compile_seconds, n_tokens / max(dt - gen.compiled.compile_seconds, 1e-9))
    sheet = write_contact_sheet(paths, out / CONTACT_SHEET, labels=labels)
    logger.info("%d token(s) in %.1fs (%.1f tokens/s); %d image(s); %s%s", n_tokens, dt, n_tokens / max(dt, 1e-9),
                len(paths), out / GENERATIONS, f", {sheet}" if sheet else "")
    print(json.dumps({"out": str(out), "images": [str(p) for p in paths], "generations": str(out / GENERATIONS),
                      "contact_sheet": str(sheet) if sheet else None}))
    return 0


class GenerationProgress:
    """A tqdm bar over samples (done of all, ETA) with the decoding rate in tokens/s; per-sample lines go
    through it (so the bar stays at the bottom) or, with --no_progress, to the log."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="sample", dynamic_ncols=True, disable=not enabled, desc="generate")
        self.enabled = enabled
        self.n_tokens, self.t0, self.shown = 0, time.perf_counter(), 0.0

    def tokens(self, n: int) -> None:
        self.n_tokens += n
        now = time.perf_counter()
        if self.enabled and now - self.shown > 0.5:  # a refresh per token would cost more than the token
            self.shown = now
            self.bar.set_postfix_str(f"{self.n_tokens / max(now - self.t0, 1e-9):.1f} tokens/s")

    def samples(self, n: int) -> None:
        self.bar.update(n)

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stderr)
        else:
            logger.info("%s", line)

    def close(self) -> None:
        self.bar.close()


class _Shell(torch.nn.Module):
    """Stands in for the model (its config only) while prompts are checked, before the weights are loaded."""

    def __init__(self, config):
        super().__init__()
        self.config = config


if __name__ == "__main__":
    sys.exit(main())

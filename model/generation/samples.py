"""Generation outputs on disk, and the samples the trainer generates from its current weights.

Owns two things:

1. ``write_generations``: the files of a generation run (generate.py and the trainer write the same):
   ``{out}/{i:05d}_{k}.png`` (image of prompt i, sample k; further images of one answer get ``-{j}``), decoded
   by the bundle's VQGAN; ``{out}/generations.jsonl``, one object per sample: prompt, text (``<|image|>``
   where an image stands), image files, prompt and generated token ids, seed, stop reason and all decoding
   settings; ``{out}/contact_sheet.png``, every image of the run on one sheet with its prompt under it.
2. ``TrainingSamples``: ``--sample_prompts FILE --sample_every N`` of finetune_solver.py. Every N optimizer
   steps and at each epoch end, all ranks generate together from the FSDP-sharded weights (model/generation/generator.py
   keeps them in lock-step) and rank 0 writes ``{output_dir}/samples/step{N}/``. Sampling leaves training
   exactly as it was: the CPU and CUDA RNG states are saved and restored around it (the generator draws only
   from its own ``torch.Generator``s anyway), and the model's train/eval mode is restored, so the losses of a
   run with sampling equal those of a run without, and resume stays bitwise.
   With ``--tensorboard`` / ``--wandb`` the pictures also go to the dashboards, with their prompts, through
   the ``on_images`` callback the trainer passes (training never imports generation).

The prompts file: ``.txt`` = text-to-image prompts, one per line (wrapped in ``--sample_template``,
generated at ``--sample_resolution``);
``.json`` / ``.jsonl`` = Lumina-format conversations ending with the human turn (answers generated).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from model.training.checkpointing import capture_rng, restore_rng
from model.generation.generator import DecodeSettings, Generation, Generator, GenerationInputError, Request
from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.vqgan import BundleError

logger = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"
GENERATIONS = "generations.jsonl"


# ----------------------------------------------------------------------------------------------------------
# files


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def image_name(g: Generation, j: int) -> str:
    return f"{g.prompt_index:05d}_{g.sample_index}" + (f"-{j}" if j else "") + ".png"


def write_generations(gens: Sequence[Generation], tokenizer: ChameleonTokenizer, out_dir: str | Path,
                      settings: dict) -> list[Path]:
    """Appends ``gens`` to ``out_dir`` (PNGs + generations.jsonl); returns the PNG paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with open(out / GENERATIONS, "a", encoding="utf-8") as f:
        for g in gens:
            names = []
            for j, codes in enumerate(g.image_codes):
                path = out / image_name(g, j)
                to_pil(tokenizer.decode_codes(torch.as_tensor(codes))).save(path)
                names.append(path.name)
                written.append(path)
            row = {"prompt_index": g.prompt_index, "sample_index": g.sample_index, "prompt": g.prompt,
                   "text": g.text, "images": names, "image_sizes": [[int(c.shape[1]) * 16, int(c.shape[0]) * 16]
                                                                   for c in g.image_codes],
                   "seed": g.seed, "stop": g.stop, "prompt_tokens": g.prompt_tokens, "tokens": g.tokens,
                   "settings": settings}
            f.write(json.dumps(row) + "\n")
    return written


def write_contact_sheet(paths: Sequence[Path], out_path: str | Path, cell: int = 256, gap: int = 4,
                        labels: Sequence[str] | None = None) -> Path | None:
    """All images on one sheet (each scaled to fit a ``cell`` square, in order, about square), or None.

    ``labels`` (one per image, e.g. its prompt) are written under the images, wrapped to the cell's width."""
    if not paths:
        return None
    ims = [Image.open(p).convert("RGB") for p in paths]
    side = min(cell, max(max(im.size) for im in ims))
    cols = int(np.ceil(np.sqrt(len(ims))))
    rows = int(np.ceil(len(ims) / cols))
    font = ImageFont.load_default()
    line_h = 12
    wrapped = [_wrap(str(t), side, font) for t in labels] if labels else []
    text_h = (max(len(w) for w in wrapped) * line_h + 2) if wrapped else 0
    sheet = Image.new("RGB", (cols * (side + gap) + gap, rows * (side + text_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for n, im in enumerate(ims):
        im.thumbnail((side, side), Image.Resampling.NEAREST if max(im.size) < side else Image.Resampling.BICUBIC)
        if max(im.size) < side:  # tiny images: scale up so the sheet is readable
            s = side / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.NEAREST)
        r, c = divmod(n, cols)
        x, y = gap + c * (side + gap), gap + r * (side + text_h + gap)
        sheet.paste(im, (x, y))
        for k, line in enumerate(wrapped[n] if n < len(wrapped) else []):
            draw.text((x, y + side + 1 + k * line_h), line, fill="black", font=font)
    sheet.save(out_path)
    return Path(out_path)


def _wrap(text: str, width: int, font) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` pixels in ``font``."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def prompt_labels(gens: Sequence[Generation]) -> list[str]:
    """The prompt of each image of ``gens``, in the order write_generations writes the images."""
    return [g.prompt for g in gens for _ in g.image_codes]


# ----------------------------------------------------------------------------------------------------------
# samples during training


def parse_resolution(text: str, flag: str = "--resolution") -> tuple[int, int]:
    """'WxH' -> (W, H); ValueError naming ``flag`` otherwise."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected WxH in pixels, e.g. 512x512") from None
    return w, h


def sample_flag_problems(a) -> list[str]:
    """The trainer's --sample_* flags: problems, each naming its flag (empty when sampling is off or fine)."""
    if a.sample_every < 0:
        return [f"--sample_every must be >= 0 (got {a.sample_every})"]
    if not a.sample_prompts:
        return []
    bad = []
    if not Path(a.sample_prompts).is_file():
        bad.append(f"--sample_prompts {a.sample_prompts}: no such file")
    if not a.sample_tokenizer_dir:
        bad.append("--sample_tokenizer_dir is required with --sample_prompts (prompts and VQGAN decoding need it)")
    elif not Path(a.sample_tokenizer_dir).is_dir():
        bad.append(f"--sample_tokenizer_dir {a.sample_tokenizer_dir}: no such directory")
    try:
        parse_resolution(a.sample_resolution, "--sample_resolution")
    except ValueError as e:
        bad.append(str(e))
    try:
        a.sample_template.replace("\\n", "\n").format(W=1, H=1, prompt="")
    except (KeyError, IndexError, ValueError) as e:
        bad.append(f"--sample_template {a.sample_template!r}: only {{W}}, {{H}} and {{prompt}} can be filled in ({e})")
    if not a.sample_cfg > 0:
        bad.append(f"--sample_cfg must be > 0 (got {a.sample_cfg})")
    if a.sample_max_new_tokens < 1:
        bad.append(f"--sample_max_new_tokens must be >= 1 (got {a.sample_max_new_tokens})")
    return bad


@contextlib.contextmanager
def rng_preserved():
    """Python, numpy and torch (CPU, CUDA) RNG states are restored on exit: training draws as if nothing ran."""
    state = capture_rng()  # the states a checkpoint keeps, so exactly what bitwise resume depends on
    try:
        yield
    finally:
        restore_rng(state)


class TrainingSamples:
    """The trainer's periodic samples (see the module docstring). ``after_step`` / ``at_epoch_end`` are the
    one-line calls of the training loop; a disabled instance (no --sample_prompts) does nothing."""

    def __init__(self, generator: Generator | None = None, requests: list[Request] | None = None,
                 settings: DecodeSettings | None = None, output_dir: str | Path = ".", every: int = 0,
                 rank: int = 0, on_images: Callable[[int, list[tuple[str, Image.Image]]], None] | None = None):
        self.generator, self.requests, self.settings = generator, requests or [], settings
        self.output_dir, self.every, self.rank = Path(output_dir), every, rank
        self.on_images = on_images
        self.last_step = -1

    @classmethod
    def build(cls, a, lm, rank: int, device: torch.device,
              on_images: Callable[[int, list[tuple[str, Image.Image]]], None] | None = None) -> "TrainingSamples":
        """See ``_build``; the global RNG streams are as before (building the VQGAN module draws from them).
        ``on_images(step, [(prompt, image), ...])`` gets each round's pictures on rank 0 (the dashboards)."""
        with rng_preserved():
            samples = cls._build(a, lm, rank, device)
        samples.on_images = on_images
        return samples

    @classmethod
    def _build(cls, a, lm, rank: int, device: torch.device) -> "TrainingSamples":
        """From the trainer's flags (``sample_prompts``, ``sample_every``, ``sample_tokenizer_dir``,
        ``sample_resolution``, ``sample_cfg``, ``seed``). Prompts are built on rank 0 and broadcast."""
        if not a.sample_prompts:
            return cls()
        try:
            tok = ChameleonTokenizer.from_bundle(a.sample_tokenizer_dir, device=device, load_vqgan=rank == 0)
        except BundleError as e:
            raise GenerationInputError(f"--sample_tokenizer_dir: {e}") from e
        from model.generation.prompts import ItemPromptBuilder, read_conversations, read_prompts_file  # item processor only
        gen = Generator(lm, tok, device=device, distributed=True,
                        prompt_builder=ItemPromptBuilder(tok) if rank == 0 else _NoPrompts())
        reqs: object = None
        if rank == 0:
            try:
                path = Path(a.sample_prompts)
                if path.suffix in (".json", ".jsonl"):
                    reqs = gen.answer_requests(read_conversations(path), base_dir=path.parent)
                else:
                    reqs = gen.image_requests(read_prompts_file(path),
                                              parse_resolution(a.sample_resolution, "--sample_resolution"),
                                              template=a.sample_template.replace("\\n", "\n"))
            except (GenerationInputError, ValueError, OSError) as e:
                reqs = GenerationInputError(f"--sample_prompts {a.sample_prompts}: {e}")
        box = [reqs]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        is_t2i = box[0] and box[0][0].image
        settings = DecodeSettings(cfg=a.sample_cfg if is_t2i else 1.0, seed=a.seed,
                                  max_new_tokens=None if is_t2i else a.sample_max_new_tokens)
        logger.info("samples: %d prompt(s) from %s every %d steps and at each epoch end, into %s/samples/",
                    len(box[0]), a.sample_prompts, a.sample_every, a.output_dir)
        return cls(gen, box[0], settings, a.output_dir, a.sample_every, rank)

    def after_step(self, step: int) -> None:
        if self.generator is not None and self.every > 0 and step % self.every == 0:
            self.sample(step)

    def at_epoch_end(self, step: int) -> None:
        if self.generator is not None:
            self.sample(step)

    def sample(self, step: int) -> Path | None:
        """Generates from the current weights (collective) and, on rank 0, writes samples/step{step}/."""
        if step == self.last_step:
            return None
        self.last_step = step
        with rng_preserved():
            gens = self.generator.run(self.requests, self.settings)
        if self.rank != 0:
            return None
        out = self.output_dir / "samples" / f"step{step}"
        if (out / GENERATIONS).exists():  # a resumed run samples the same step again: start the folder afresh
            for p in out.iterdir():
                p.unlink()
        paths = write_generations(gens, self.generator.tokenizer, out, {"step": step, **vars(self.settings)})
        labels = prompt_labels(gens)
        sheet = write_contact_sheet(paths, out / CONTACT_SHEET, labels=labels)
        logger.info("step %d: samples in %s (%d image(s)%s)", step, out, len(paths),
                    f", sheet {sheet}" if sheet else "")
        for g in gens:
            if not g.image_codes:
                logger.info("  sample %d: %s", g.prompt_index, g.text[:200])
        if self.on_images is not None and paths:
            self.on_images(step, [(label, Image.open(p).convert("RGB")) for label, p in zip(labels, paths)])
        return out


class _NoPrompts:
    """Prompt builder of ranks other than 0: their prompts come from rank 0."""

    def text_to_image(self, *a, **k):
        raise RuntimeError("prompts are built on rank 0")

    conversation = text_to_image

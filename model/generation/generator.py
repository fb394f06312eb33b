"""Sampling from a Chameleon / Lumina-mGPT model: images with classifier-free guidance and text answers.

    from model.generation.generator import Generator
    gen = Generator.from_pretrained("output/run/epoch0/hf", "ckpts/chameleon/tokenizer", device="cpu",
                                    precision="fp32")
    outs = gen.generate_images(["A red bicycle"], resolution=(512, 512), n=4, cfg=4.0, seed=0)
    pixels = gen.decode_images(outs[0])            # [3, H, W] float tensors in [-1, 1], one per image
    answers = gen.answer([{"conversations": [{"from": "human", "value": "<|image|> What is this?"}],
                           "image": ["cat.jpg"]}], cfg=1.0)
    print(answers[0].text)

One ``Generator`` serves ``generate.py``, the trainer's samples (model/generation/samples.py) and bench/bench_generate.py.
``--model`` may be an HF-format directory (ours, Lumina-mGPT's, Meta's: whatever ``--init_from`` loads, read by
model/chameleon_lm.py) or a training checkpoint ``epoch{E}[-iter{I}]/`` (read through the safe DCP loader of
model/training/checkpointing.py, as resume does).

Decoding rules: Lumina-mGPT's ``inference_solver.py`` (its three logits processors, in their order), per row:

- Image block. After ``<racm3:break>`` come the height and width size tokens, then H/16 rows of W/16 codes
  (vocabulary ids of the ``IMGIMG..Z`` entries only, 4..8195), ``<reserved08799>`` forced at each row end,
  ``<eoss>`` forced after the last row; the grid is read from the size tokens as Lumina does. With a
  resolution the size tokens are forced; without, the model chooses them. Lumina leaves those two positions
  unconstrained (a non-size token there gives it an undefined grid); here only size tokens whose block fits
  the context can be chosen. ``generate_images`` also forces ``<racm3:break>`` as the first token (a
  text-to-image call that yields no image is of no use; a trained model emits it there anyway).
- Classifier-free guidance once both size tokens are in, until the block closes (Lumina's
  ``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor``): scores = cfg * (cond - uncond)
  + uncond, where the unconditional context is the sequence from ``<racm3:break>`` on, at positions from 0.
  cfg == 1 turns it off (no unconditional rows at all).
- Processors in order: CFG, the image-block constraints (``MultiModalLogitsProcessor``), top-k with
  ``image_top_k`` inside a block and ``text_top_k`` outside (``InterleavedTopKLogitsWarper``), then
  temperature and top-p (transformers appends its sampling warpers after custom processors). Text stops
  at ``<reserved08706>``.
- Special ids come from the tokenizer bundle, found by name (model/tokenizer/bundle.py).

Faster than Lumina's loop: Lumina runs the conditional and the unconditional sequence as two forwards per
token, one prompt at a time. Here every sample (several prompts, ``n`` samples each) has a conditional row and,
with CFG, an unconditional row, all in ONE batched forward per token with one KV cache
(transformers' ``DynamicCache``). Rows are left-padded with an attention mask and each has its own
position ids, so their logits equal those of unpadded single-row forwards. The unconditional row of a
sample receives the same tokens as its conditional row from ``<racm3:break>`` on, at positions 0, 1, ...
(Lumina's separate forward); before that, and after the block, it is masked out, and when a new block
starts its earlier cache entries are masked away (Lumina starts a new cache).

Compiled (``compile=True``, ``generate.py --compile``): a static KV cache and a torch.compile'd decoder step,
model/generation/compiled.py; the prefill, the head and the processors stay eager (tensor ops right after the
compiled step), so compiled and eager runs pick the same tokens. What the processors will do with a step's
logits is known from the rows' state before the forward (``_plan``): when every row that is not forced
samples an image code, the head is computed over the code columns only (everything else would be masked to
-inf anyway; 1/8 of Chameleon's 65536-entry head), and when every row is forced (row ends, ``<eoss>``) no
head is computed at all.

Randomness: each sample draws from its own ``torch.Generator`` seeded from (seed, prompt index, sample
index), the same number of values at every step (an exponential race: argmax of p / E), so sample k of
prompt i gets the same tokens whether it is generated alone or in a batch (batched matmuls round
differently, which could flip a pick only at an exact near-tie; greedy decoding is batch-invariant). The
global RNG streams are never touched (the trainer relies on that).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from transformers import ChameleonConfig, DynamicCache

from model.chameleon_lm import (ChameleonLM, ModelLoadError, build_chameleon_lm, config_from_dict, load_hf_config,
                                only_model_keys, read_hf_weights, resolve_hf_dir)
from model.generation.compiled import CompiledDecodeStep
from model.generation.prompts import T2I_TEMPLATE, GenerationInputError, ItemPromptBuilder, PromptBuilder
from model.tokenizer.bundle import PIXELS_PER_SIZE_UNIT, ChameleonTokenizer, size_token_name

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<|image|>"
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# settings, requests, results


@dataclass
class DecodeSettings:
    """Lumina's published text-to-image settings are the defaults (cfg 4, image top-k 2000, temperature 1)."""

    cfg: float = 4.0
    image_top_k: int = 2000
    text_top_k: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int | None = None  # None: the image block (images) / 512 (text), bounded by the context
    seed: int = 0

    def check(self) -> None:
        problems = []
        if not self.cfg > 0:
            problems.append(f"cfg must be > 0 (got {self.cfg})")
        if self.image_top_k < 1 or self.text_top_k < 1:
            problems.append(f"image_top_k and text_top_k must be >= 1 (got {self.image_top_k}, {self.text_top_k})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if problems:
            raise GenerationInputError("; ".join(problems))


@dataclass
class Request:
    """One sample to generate: its prompt tokens, what to stop at, and which seed stream it draws from.

    ``image``: start an image block at once (force ``<racm3:break>``) and stop when it closes; else stop at
    ``<reserved08706>``. ``size``: (height, width) in 32-px units to force as the size tokens, or None.
    """

    tokens: list[int]
    prompt_index: int = 0
    sample_index: int = 0
    image: bool = False
    size: tuple[int, int] | None = None
    prompt: str = ""  # what the user gave, for the record


@dataclass
class Generation:
    """One generated sample. ``tokens`` are the new ids (with the final ``<reserved08706>`` / ``<eoss>``),
    ``text`` the decoded text with ``<|image|>`` where an image stands, ``image_codes`` one [h, w] VQ-code
    grid per image block, ``stop``: eot | image | max_new_tokens | context."""

    prompt_index: int
    sample_index: int
    seed: int
    prompt: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    image_codes: list[np.ndarray] = field(default_factory=list)
    stop: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["image_codes"] = [c.tolist() for c in self.image_codes]
        return d


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index``: independent streams, no collisions
    between (i, k) pairs (a hash, not a sum)."""
    h = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class SpecialTokens:
    """The ids decoding needs, found by name in the bundle's vocabulary."""

    def __init__(self, tok: ChameleonTokenizer, vocab_size: int):
        self.boi, self.eoi, self.eol, self.eot, self.pad = tok.boi_id, tok.eoi_id, tok.eol_id, tok.eot_id, tok.pad_id
        self.vocab_size = vocab_size
        codes = torch.tensor(tok.image_token_ids, dtype=torch.long)
        if int(codes.max()) >= vocab_size:
            raise GenerationInputError(f"the bundle's image codes reach id {int(codes.max())} but the model has "
                                       f"only {vocab_size} logits: bundle and model do not belong together")
        self.code_mask = torch.zeros(vocab_size, dtype=torch.bool)
        self.code_mask[codes] = True
        self.size_id: dict[int, int] = {}  # n (32-px units) -> id
        for n in range(1, 1000):
            name = size_token_name(n)
            if name in tok.vocab and tok.vocab[name] < vocab_size:
                self.size_id[n] = tok.vocab[name]
        self.size_of: dict[int, int] = {i: n for n, i in self.size_id.items()}


def race_noise(gen: torch.Generator, n: int, device: torch.device | str) -> torch.Tensor:
    """n i.i.d. Exp(1) draws of the exponential race, as -log(U) of uniforms: 5x cheaper on a CPU than
    ``Tensor.exponential_`` (39 vs 196 us for 10760 values, 1 thread), and drawn per sample every step."""
    return torch.rand(n, generator=gen, device=device).log_().neg_()


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of ``scores`` [R, C], as [R, 1]: top-k's threshold, by selection.

    Selection, not sorting: on a CPU numpy's introselect (about 10 us for 8192 values, on the tensor's own
    memory) beats ``torch.kthvalue`` (25-120 us per step on the bench model, which copies its input) and
    ``torch.topk`` (120 us); every exact selection gives the same value."""
    C = scores.shape[-1]
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        part = np.partition(scores.detach().numpy(), C - k, axis=-1)[:, C - k:C - k + 1]
        return torch.from_numpy(np.ascontiguousarray(part))
    return torch.kthvalue(scores, C - k + 1, dim=-1, keepdim=True).values


def block_len(h_units: int, w_units: int) -> int:
    """Tokens of an image block with sides of h_units / w_units x 32 px, <racm3:break> and <eoss> included."""
    return 3 + 2 * h_units * (2 * w_units + 1) + 1


# ----------------------------------------------------------------------------------------------------------
# per-row decoding state (Lumina's processors look at the whole sequence; we keep the same facts as counters)


class _Row:
    __slots__ = ("in_block", "n", "h_id", "h", "w", "size", "force_boi", "done", "stop", "pos", "upos", "budget")

    def __init__(self, req: Request, specials: SpecialTokens, budget: int, prompt_pos: int):
        self.in_block = False
        self.n = 0  # tokens after the open <racm3:break>
        self.h_id = -1  # the height size token, once chosen
        self.h = self.w = 0  # latent rows / columns (2 x size units), known after both size tokens
        self.size = req.size
        self.force_boi = req.image
        self.done = False
        self.stop = ""
        self.pos = prompt_pos  # position of the next conditional token
        self.upos = 0  # unconditional tokens so far (<racm3:break> on)
        self.budget = budget  # new tokens left
        toks = req.tokens
        opened = max((i for i, t in enumerate(toks) if t == specials.boi), default=-1)
        if opened >= 0 and specials.eoi not in toks[opened:]:  # the prompt ends inside an image block
            self.in_block, self.force_boi = True, False
            self.n = len(toks) - opened - 1
            self.upos = self.n + 1
            if self.n >= 1:
                self.h_id = toks[opened + 1]
            if self.n >= 2:
                self._read_grid(toks[opened + 2], specials)

    def _read_grid(self, w_id: int, specials: SpecialTokens) -> None:
        # Lumina reads the grid from the two size tokens (id - 8804) * 2; by name here
        self.h, self.w = 2 * specials.size_of.get(self.h_id, 0), 2 * specials.size_of.get(w_id, 0)

    def advance(self, tok: int, specials: SpecialTokens) -> None:
        self.pos += 1
        self.budget -= 1
        if self.in_block:
            self.n += 1
            self.upos += 1
            if self.n == 1:
                self.h_id = tok
            elif self.n == 2:
                self._read_grid(tok, specials)
            if tok == specials.eoi:
                self.in_block = False
                if self.force_boi is None:  # generate_images: one image, then stop
                    self.done, self.stop = True, "image"
        elif tok == specials.boi:
            self.in_block, self.n, self.upos = True, 0, 1
            if self.force_boi:
                self.force_boi = None  # forced once; None marks "stop after this block"
        elif tok == specials.eot:
            self.done, self.stop = True, "eot"
        if not self.done and self.budget <= 0:
            self.done, self.stop = True, "max_new_tokens"


@dataclass
class _Plan:
    """What the processors do with one step's logits, known before the forward (see ``Generator._plan``)."""

    forced: torch.Tensor  # [B] long: the forced token, -1 where the row samples
    in_block: torch.Tensor  # [B] bool
    cfg_rows: list[int]
    code_rows: list[int]
    size_rows: list[int]
    all_forced: bool  # no logits needed at all
    codes_only: bool  # every free row samples an image code: the head over the code columns only


# ----------------------------------------------------------------------------------------------------------
# loading


def is_training_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and (p / "trainer_state.json").is_file()


def read_model_config(model: str | Path) -> ChameleonConfig:
    """The model's config without its weights (for checks before any compute). ModelLoadError names --model."""
    p = Path(model).expanduser()
    if is_training_checkpoint(p):
        try:
            raw = json.loads((p / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"--model {model}: cannot read its config.json ({e})") from e
        return config_from_dict(raw, where=str(p / "config.json"))
    if not p.exists() and str(model).startswith((".", "/", "~")):
        raise ModelLoadError(f"--model {model}: no such directory")
    return load_hf_config(resolve_hf_dir(str(model)))


def load_lm(model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ChameleonLM:
    """An unsharded ``ChameleonLM`` in eval mode from an HF-format dir (or hub id) or a training checkpoint."""
    p = Path(model).expanduser()
    if is_training_checkpoint(p):
        from model.training.checkpointing import CheckpointError
        from model.export_hf import load_lm_from_checkpoint
        try:
            lm = load_lm_from_checkpoint(p)
        except CheckpointError as e:
            raise ModelLoadError(f"--model {model}: {e}") from e
    else:
        d = resolve_hf_dir(str(model))
        config = load_hf_config(d)
        lm = build_chameleon_lm(config, device="meta")
        lm.to_empty(device="cpu")
        sd = only_model_keys(read_hf_weights(d, config), set(lm.state_dict()), f"--model {model}")
        lm.load_state_dict(sd, strict=True)
    lm.to(device=device, dtype=dtype)
    lm.reset_nonpersistent_buffers(device)  # rotary frequencies in fp32 whatever the weights' dtype
    return lm.eval()


# ----------------------------------------------------------------------------------------------------------
# the generator


class Generator:
    """Batched decoding with Lumina's rules over a ``ChameleonLM`` (``.model`` decoder + ``.lm_head``).

    ``lm`` may be FSDP-sharded (the trainer's): pass ``distributed=True`` and call on every rank with the
    same requests; the ranks run every forward together and take rank 0's tokens, so they stay in lock-step.
    """

    def __init__(self, lm: ChameleonLM, tokenizer: ChameleonTokenizer, *, device: str | torch.device = "cpu",
                 prompt_builder: PromptBuilder | None = None, distributed: bool = False, target_size: int = 512,
                 compile: bool = False):
        self.lm = lm
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.config = lm.config
        self.specials = SpecialTokens(tokenizer, int(self.config.vocab_size))
        self.max_positions = int(self.config.max_position_embeddings)
        self.distributed = distributed
        self._code_mask = self.specials.code_mask.to(self.device)
        codes = self.specials.code_mask.nonzero().flatten()
        # the code ids as one column range (Chameleon: 4..8195), for the code-only head; None if scattered
        lo, hi = int(codes[0]), int(codes[-1]) + 1
        self._code_cols = (lo, hi) if hi - lo == codes.numel() else None
        if prompt_builder is None:
            # the item processor's rules, so prompts are token-identical to training sequences
            prompt_builder = ItemPromptBuilder(tokenizer, target_size=target_size)
        self.prompt_builder = prompt_builder
        # compile=True: a static KV cache and a torch.compile'd decode step (model/generation/compiled.py)
        self.compiled: CompiledDecodeStep | None = None
        if compile:
            if hasattr(lm, "unshard"):
                # an FSDP-sharded model (the trainer's samples): its forward gathers parameters through hooks,
                # which a compiled decode step would trace into every graph; these few samples decode eagerly
                logger.warning("--compile: the decode step of a sharded model is not compiled; decoding eagerly")
            else:
                self.compiled = CompiledDecodeStep(self._hidden, self.config, self.device, self.max_positions)

    @classmethod
    def from_pretrained(cls, model: str | Path, tokenizer_dir: str | Path, device: str | torch.device | None = None,
                        precision: str = "fp32", **kw) -> "Generator":
        """Loads the model (HF dir, hub id or training checkpoint) and the tokenizer bundle (with its VQGAN)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = ChameleonTokenizer.from_bundle(tokenizer_dir, device=device)
        lm = load_lm(model, device=device, dtype=DTYPES[precision])
        return cls(lm, tokenizer, device=device, **kw)

    # ------------------------------------------------------------------------------------------ requests

    def check_resolution(self, width: int, height: int, prompt_len: int = 0,
                         what: str = "--resolution") -> tuple[int, int]:
        """(height, width) in 32-px units; GenerationInputError if not on the bundle's grid or too long."""
        g = PIXELS_PER_SIZE_UNIT
        if width < g or height < g or width % g or height % g:
            raise GenerationInputError(f"{what} {width}x{height}: both sides must be positive multiples of {g} px "
                                       f"(the bundle's size tokens count {g}-px units)")
        hn, wn = height // g, width // g
        for n in (hn, wn):
            if n not in self.specials.size_id:
                raise GenerationInputError(f"{what} {width}x{height}: the vocabulary has no size token "
                                           f"{size_token_name(n)} for a side of {n * g} px")
        need = prompt_len + block_len(hn, wn)
        if need > self.max_positions:
            raise GenerationInputError(f"{what} {width}x{height}: the prompt ({prompt_len} tokens) and the image block "
                                       f"({block_len(hn, wn)} tokens) need {need} positions, but the model has "
                                       f"max_position_embeddings {self.max_positions}")
        return hn, wn

    def image_requests(self, prompts: Sequence[str], resolution: tuple[int, int] | None = None, n: int = 1, *,
                       template: str = T2I_TEMPLATE, start_index: int = 0) -> list[Request]:
        """Requests for text-to-image prompts. With ``resolution`` (W, H) the prompt is wrapped in ``template``
        and the size tokens are forced; without, the prompt is the human turn as written."""
        out = []
        for j, text in enumerate(prompts):
            i = start_index + j
            w, h = resolution if resolution is not None else (None, None)
            toks = self.prompt_builder.text_to_image(text, w, h, template)
            size = None
            if resolution is not None:
                size = self.check_resolution(w, h, len(toks), what=f"prompt {i}: --resolution")
            else:
                smallest = block_len(1, 1) if self.specials.size_id else 1
                if len(toks) + smallest > self.max_positions:
                    raise GenerationInputError(f"prompt {i} ({text[:60]!r}...): {len(toks)} tokens leave no room for "
                                               f"an image in max_position_embeddings {self.max_positions}")
            out += [Request(toks, i, k, image=True, size=size, prompt=text) for k in range(n)]
        return out

    def answer_requests(self, conversations: Sequence[dict], n: int = 1, *, start_index: int = 0,
                        base_dir: str | Path | None = None) -> list[Request]:
        """Requests for Lumina-format items whose last turn is the human's (or ``{"from": "gpt", "value": null}``)."""
        out = []
        for j, item in enumerate(conversations):
            i = start_index + j
            try:
                toks = self.prompt_builder.conversation(item, base_dir)
            except ValueError as e:
                raise GenerationInputError(f"conversation {i}: {e}") from e
            if len(toks) >= self.max_positions:
                raise GenerationInputError(f"conversation {i}: the prompt is {len(toks)} tokens, which leaves no room "
                                           f"to answer in max_position_embeddings {self.max_positions}")
            last = next((m.get("value") for m in reversed(item["conversations"]) if m.get("value") is not None), "")
            out += [Request(toks, i, k, image=False, prompt=str(last)) for k in range(n)]
        return out

    # -------------------------------------------------------------------------------------------- public

    def generate_images(self, prompts: Sequence[str], resolution: tuple[int, int] | None = None, n: int = 1, *,
                        template: str = T2I_TEMPLATE, start_index: int = 0, batch_size: int | None = None,
                        **settings) -> list[Generation]:
        """n images per prompt (``settings``: fields of DecodeSettings). Returns prompt-major Generations."""
        reqs = self.image_requests(prompts, resolution, n, template=template, start_index=start_index)
        return self.run(reqs, DecodeSettings(**settings), batch_size=batch_size)

    def answer(self, conversations: Sequence[dict], n: int = 1, *, start_index: int = 0,
               base_dir: str | Path | None = None, batch_size: int | None = None, **settings) -> list[Generation]:
        """n answers per conversation (text, with images where the model writes image blocks)."""
        settings.setdefault("cfg", 1.0)
        reqs = self.answer_requests(conversations, n, start_index=start_index, base_dir=base_dir)
        return self.run(reqs, DecodeSettings(**settings), batch_size=batch_size)

    def run(self, requests: Sequence[Request], settings: DecodeSettings, batch_size: int | None = None,
            observer: Callable | None = None, progress: Callable[[int], None] | None = None,
            pad_last: bool = False) -> list[Generation]:
        """Decodes ``requests`` in chunks of ``batch_size`` samples (all at once if None). ``progress(n)`` is
        called after every decoding step with the number of tokens it produced. ``pad_last``: a caller that
        feeds one run in several calls says that this short chunk follows full ones (see below)."""
        settings.check()
        bs = batch_size or max(len(requests), 1)
        out: list[Generation] = []
        for s in range(0, len(requests), bs):
            chunk = list(requests[s:s + bs])
            n = len(chunk)
            if self.compiled is not None and self.compiled.failed is None and 0 < n < bs and (s > 0 or pad_last):
                # a short last batch: pad it with copies of its last request (results dropped), so the compiled
                # step keeps the batch's shapes and is not compiled again for a few samples
                chunk += [chunk[-1]] * (bs - n)
            out += self.decode(chunk, settings, observer=observer, progress=progress)[:n]
        return out

    def decode_images(self, gen: Generation) -> list[torch.Tensor]:
        """Pixels [3, H, W] in [-1, 1] (CPU float32) of each image of a Generation (the bundle's VQGAN)."""
        return [self.tokenizer.decode_codes(torch.as_tensor(c)) for c in gen.image_codes]

    # -------------------------------------------------------------------------------------------- core

    @contextlib.contextmanager
    def _inference(self):
        """eval mode, no grad, and (FSDP) the root unit's own parameters gathered: calling ``lm.model`` and
        ``lm.lm_head`` directly bypasses the root's forward hooks, which would gather them (the final norm)."""
        was_training = self.lm.training
        self.lm.eval()
        unshard = hasattr(self.lm, "unshard") and hasattr(self.lm, "reshard")
        try:
            if unshard:
                self.lm.unshard()
            with torch.no_grad():
                yield
        finally:
            if unshard:
                self.lm.reshard()
            self.lm.train(was_training)

    def _hidden(self, ids, mask, pos, cache) -> torch.Tensor:
        """The decoder's last hidden state of each row [R, H] (what the compiled step compiles)."""
        return self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True).last_hidden_state[:, -1]

    def _head(self, hidden: torch.Tensor, plan: "_Plan") -> torch.Tensor | None:
        """fp32 logits [R, V], or [R, C] over the image-code columns only when every row that is not forced
        samples a code (inside an image block all other columns are masked anyway: on Chameleon's 65536-entry
        vocabulary that skips 7/8 of the head), or None when every row is forced."""
        if plan.all_forced:
            return None
        if hasattr(self.lm, "unshard"):  # FSDP: the head's own hooks must gather its weight
            return self.lm.lm_head(hidden).float()
        w = self.lm.lm_head.weight
        if plan.codes_only:
            w = w[self._code_cols[0]:self._code_cols[1]]
        if self.device.type == "cpu" and hidden.shape[0] > 2:
            # On a CPU (MKL), [rows, H] x [V, H]^T for 4-16 rows is up to 1.5x slower than W @ h^T, which
            # streams the row-major [V, H] head weight once; for 1-2 rows (batch 1 with CFG) it is the other
            # way round, 1.8x (bench/RESULTS.md, issue 24). The head is the largest matmul of a decoding step.
            return torch.mm(w, hidden.to(w.dtype).t()).t().float()
        return torch.nn.functional.linear(hidden.to(w.dtype), w).float()

    def decode(self, requests: list[Request], st: DecodeSettings, observer: Callable | None = None,
               progress: Callable[[int], None] | None = None) -> list[Generation]:
        """One batched decoding of ``requests`` (conditional rows, then one unconditional row each with CFG)."""
        if not requests:
            return []
        sp, dev = self.specials, self.device
        B = len(requests)
        use_cfg = st.cfg != 1.0
        R = 2 * B if use_cfg else B
        default_budget = 512
        rows, steps = [], 0
        for r in requests:
            room = self.max_positions - len(r.tokens)
            if r.image:  # the block, <racm3:break> to <eoss>; without a size, whatever fits
                want = block_len(*r.size) if r.size is not None else room
            else:
                want = default_budget
            budget = min(st.max_new_tokens or want, room)
            if budget < 1:
                raise GenerationInputError(f"prompt {r.prompt_index}: {len(r.tokens)} tokens fill the context "
                                           f"(max_position_embeddings {self.max_positions})")
            rows.append(_Row(r, sp, budget, len(r.tokens)))
            steps = max(steps, budget)

        # each sample draws from its own generator (the global RNG streams are untouched)
        seeds = [sample_seed(st.seed, r.prompt_index, r.sample_index) for r in requests]
        gens = None if st.greedy else [torch.Generator(device=dev).manual_seed(s) for s in seeds]

        # prefill: left padding, per-row positions; unconditional rows hold the open block's tail, if any
        width = max(len(r.tokens) for r in requests)
        total = width + steps
        # compiled: a static cache of a bucketed length, the mask as wide as the cache (columns not yet
        # written are 0) so every step has the same shapes; eager: a DynamicCache and a growing mask
        cache = None
        if self.compiled is not None:
            cache = self.compiled.prepare(R, self.compiled.cache_len(total))
        static = cache is not None
        if static:
            total = self.compiled.cache_len(total)
        else:
            cache = DynamicCache(config=self.config)
        step_fn = self.compiled.step if static else self._hidden
        ids = torch.full((R, width), sp.pad, dtype=torch.long)
        mask = torch.zeros((R, total), dtype=torch.long)
        pos = torch.zeros((R, width), dtype=torch.long)
        for b, r in enumerate(requests):
            L = len(r.tokens)
            ids[b, width - L:] = torch.tensor(r.tokens)
            mask[b, width - L:width] = 1
            pos[b, width - L:] = torch.arange(L)
            if use_cfg and rows[b].in_block:
                tail = r.tokens[L - rows[b].upos:]
                ids[B + b, width - len(tail):] = torch.tensor(tail)
                mask[B + b, width - len(tail):width] = 1
                pos[B + b, width - len(tail):] = torch.arange(len(tail))
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        generated: list[list[int]] = [[] for _ in range(B)]
        cur = width
        with self._inference(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed.*")
            hidden = self._hidden(ids, mask if static else mask[:, :cur], pos, cache)  # prefill: eager
            for t in range(steps):
                plan = self._plan(rows, B, use_cfg, full=observer is not None)
                toks = self._pick(self._head(hidden, plan), plan, rows, B, use_cfg, st, gens, observer, t)
                if self.distributed and dist.is_initialized() and dist.get_world_size() > 1:
                    toks = toks.to(dev)
                    dist.broadcast(toks, src=0)  # every rank continues with rank 0's tokens: lock-step
                    toks = toks.cpu()
                tl = toks.tolist()
                # the next step's inputs as Python lists, one tensor each at the end (element-wise tensor
                # writes cost ~5 us apiece, which at batch 8 with CFG was a millisecond per token)
                step_ids, step_pos, col = [sp.pad] * R, [0] * R, [0] * R
                for b, row in enumerate(rows):
                    if row.done:
                        continue
                    tok = tl[b]
                    generated[b].append(tok)
                    starts_block = not row.in_block and tok == sp.boi
                    step_ids[b], step_pos[b], col[b] = tok, row.pos, 1
                    row.advance(tok, sp)
                    if use_cfg and row.in_block:  # from <racm3:break> up to the last code row
                        if starts_block:
                            mask[B + b, :cur] = 0  # a new block: a fresh unconditional context
                        step_ids[B + b], step_pos[B + b], col[B + b] = tok, row.upos - 1, 1
                if progress is not None:
                    progress(sum(col[:B]))
                if all(row.done for row in rows) or t == steps - 1:
                    break
                mask[:, cur] = torch.tensor(col, dtype=torch.long, device=dev)
                cur += 1
                hidden = step_fn(torch.tensor(step_ids, dtype=torch.long, device=dev)[:, None],
                                 mask if static else mask[:, :cur],
                                 torch.tensor(step_pos, dtype=torch.long, device=dev)[:, None], cache)
        for row in rows:
            if not row.done:
                row.stop = "context" if row.pos >= self.max_positions else "max_new_tokens"
        return [self._result(r, rows[b], generated[b], seeds[b]) for b, r in enumerate(requests)]

    def _plan(self, rows: list[_Row], B: int, use_cfg: bool, full: bool) -> "_Plan":
        """What the processors will do with each conditional row's next logits, from the rows' state alone
        (so the head can skip what will be masked): Lumina's forcing, the block's size and code positions."""
        sp = self.specials
        forced, in_block = [-1] * B, [False] * B  # lists: element-wise tensor writes cost ~5 us apiece
        cfg_rows, code_rows, size_rows = [], [], []
        for b, row in enumerate(rows):
            if row.done:
                forced[b] = sp.pad
                continue
            if not row.in_block:
                if row.force_boi:  # True until the forced <racm3:break> is out
                    forced[b] = sp.boi
                continue
            in_block[b] = True
            if row.n < 2:  # the size tokens
                if row.size is not None:
                    forced[b] = sp.size_id[row.size[row.n]]
                else:
                    size_rows.append(b)
                continue
            if use_cfg:
                cfg_rows.append(b)
            k = row.n - 2  # tokens after the size tokens so far
            if row.w <= 0 or row.h <= 0:
                forced[b] = sp.eoi  # an unreadable grid (only from a prompt that holds one): close the block
            elif (k + 1) % (row.w + 1) == 0:
                forced[b] = sp.eol
            elif k + 1 == (row.w + 1) * row.h + 1:
                forced[b] = sp.eoi
            else:
                code_rows.append(b)
        n_forced = sum(f >= 0 for f in forced)
        codes_only = (bool(code_rows) and len(code_rows) + n_forced == B and self._code_cols is not None
                      and not full and not hasattr(self.lm, "unshard"))
        return _Plan(torch.tensor(forced, dtype=torch.long), torch.tensor(in_block), cfg_rows, code_rows, size_rows,
                     all_forced=n_forced == B and not full, codes_only=codes_only)

    def _pick(self, logits: torch.Tensor | None, plan: "_Plan", rows: list[_Row], B: int, use_cfg: bool,
              st: DecodeSettings, gens: list[torch.Generator] | None, observer, t: int) -> torch.Tensor:
        """Lumina's processors in order on the B conditional rows, then the choice of each row's token."""
        forced, in_block = plan.forced, plan.in_block
        cfg_rows, code_rows, size_rows = plan.cfg_rows, plan.code_rows, plan.size_rows
        if plan.all_forced:  # every row forced (a row end, <eoss>): no processor changes the outcome
            for g in gens or ():
                race_noise(g, self.specials.vocab_size, self.device)  # keep streams aligned
            return forced
        if plan.codes_only:
            return self._pick_codes(logits, plan, B, st, gens)
        cond = logits[:B]
        if len(cfg_rows) == B:  # the common case: no indexing
            unc = logits[B:]
            scores = st.cfg * (cond - unc) + unc
        else:
            scores = cond.clone()  # modified in place below; the observer may look at the logits
        if cfg_rows and len(cfg_rows) < B:
            idx = torch.tensor(cfg_rows, device=logits.device)
            unc = logits[B:][idx]
            scores[idx] = st.cfg * (cond[idx] - unc) + unc
        if observer is not None:
            observer(t, logits, scores, list(cfg_rows))
        if code_rows:
            rmask = torch.zeros(B, 1, dtype=torch.bool)
            rmask[code_rows] = True
            scores.masked_fill_(rmask.to(logits.device) & ~self._code_mask, -math.inf)
        for b in size_rows:
            scores[b] = scores[b].masked_fill(~self._size_mask(rows[b]), -math.inf)
        fidx = (forced >= 0).nonzero().flatten().tolist()
        if len(fidx) == B:  # (with an observer, which sees every step's logits) all rows forced
            for g in gens or ():
                race_noise(g, scores.shape[-1], scores.device)  # keep streams aligned
            return forced
        if fidx:  # Lumina's forcing: -inf everywhere but the forced token
            fi = torch.tensor(fidx, device=logits.device)
            scores[fi] = -math.inf
            scores[fi, forced[fi.cpu()].to(logits.device)] = 0.0
        # top-k: image_top_k inside a block, text_top_k outside (per row, Lumina's threshold rule)
        V = scores.shape[-1]
        ks = torch.where(in_block, min(st.image_top_k, V), min(st.text_top_k, V)).to(logits.device)
        kth = torch.topk(scores, int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
        scores = scores.masked_fill(scores < kth, -math.inf)
        if st.greedy:
            return scores.argmax(dim=-1).cpu()
        scores = scores / st.temperature
        if st.top_p < 1.0:  # transformers' TopPLogitsWarper (min_tokens_to_keep=1)
            srt, order = torch.sort(scores, descending=False)
            cum = srt.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= (1 - st.top_p)
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
        # exponential race: argmax(p / E), E ~ Exp(1) i.i.d., picks token i with probability p_i. Every row
        # draws V numbers per step, forced or not, so its stream stays aligned however it is batched; and
        # a float-rounding change of the probabilities (another batch shape) flips a pick only at a near-tie
        # (inverse-CDF sampling would move across thousands of near-equal image-code probabilities)
        noise = torch.stack([race_noise(g, V, scores.device) for g in gens])
        return (scores.softmax(dim=-1) / noise).argmax(dim=-1).cpu()

    def _pick_codes(self, logits: torch.Tensor, plan: "_Plan", B: int, st: DecodeSettings,
                    gens: list[torch.Generator] | None) -> torch.Tensor:
        """``_pick`` where every free row samples an image code and ``logits`` hold the code columns only:
        the same processors (CFG, top-k, temperature, top-p, the exponential race) over those columns; forced
        rows (row ends, <eoss>, finished rows) take their forced token, as the masking in ``_pick`` gives."""
        lo = self._code_cols[0]
        cond = logits[:B]
        if len(plan.cfg_rows) == B:
            unc = logits[B:]
            scores = st.cfg * (cond - unc) + unc
        elif plan.cfg_rows:
            scores = cond.clone()
            idx = torch.tensor(plan.cfg_rows, device=logits.device)
            unc = logits[B:][idx]
            scores[idx] = st.cfg * (cond[idx] - unc) + unc
        else:
            scores = cond
        C = scores.shape[-1]
        k = min(st.image_top_k, C)
        kth = kth_largest(scores, k)
        scores = scores.masked_fill(scores < kth, -math.inf)
        forced = plan.forced.to(logits.device)
        if st.greedy:
            return torch.where(forced >= 0, forced, scores.argmax(dim=-1) + lo).cpu()
        scores = scores / st.temperature
        if st.top_p < 1.0:
            srt, order = torch.sort(scores, descending=False)
            cum = srt.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= (1 - st.top_p)
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
        # every row draws its V numbers, as in _pick, and uses those of the code columns
        V = self.specials.vocab_size
        noise = torch.stack([race_noise(g, V, scores.device) for g in gens])
        picks = (scores.softmax(dim=-1) / noise[:, lo:lo + C]).argmax(dim=-1) + lo
        return torch.where(forced >= 0, forced, picks).cpu()

    def _size_mask(self, row: _Row) -> torch.Tensor:
        """Size tokens whose block (with the least other side for the height) fits the row's budget."""
        room = row.budget + row.n  # tokens left for the block after <racm3:break>, counted from it
        m = torch.zeros(self.specials.vocab_size, dtype=torch.bool)
        for n_, i in self.specials.size_id.items():
            if row.n == 0:
                ok = block_len(n_, 1) - 1 <= room
            else:
                ok = block_len(self.specials.size_of.get(row.h_id, 1), n_) - 1 <= room
            if ok:
                m[i] = True
        if not m.any():
            m[self.specials.size_id[min(self.specials.size_id)]] = True
        return m.to(self.device)

    def _result(self, req: Request, row: _Row, toks: list[int], seed: int) -> Generation:
        sp, tok = self.specials, self.tokenizer
        texts, codes, cur, i = [], [], [], 0
        while i < len(toks):
            if toks[i] == sp.boi:
                end = toks.index(sp.eoi, i) if sp.eoi in toks[i:] else None
                if end is None:  # an unfinished block (budget/context ran out): no image
                    break
                texts.append(tok.decode_text(cur))
                cur = []
                try:
                    codes.append(tok.parse_image_block(toks[i:end + 1]))
                except ValueError as e:
                    logger.warning("prompt %d sample %d: an image block could not be read (%s)", req.prompt_index,
                                   req.sample_index, e)
                i = end + 1
                continue
            if toks[i] != sp.eot:
                cur.append(toks[i])
            i += 1
        texts.append(tok.decode_text(cur))
        return Generation(prompt_index=req.prompt_index, sample_index=req.sample_index, seed=seed, prompt=req.prompt,
                          prompt_tokens=list(req.tokens), tokens=toks, text=IMAGE_MARKER.join(texts),
                          image_codes=codes, stop=row.stop)

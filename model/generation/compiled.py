"""A compiled decode step over a static KV cache: what ``Generator(..., compile=True)`` and ``generate.py
--compile`` decode with.

Why. One decoding step of a small model (or of a 7B model at batch 1-2 on a GPU) is mostly Python and
framework overhead: transformers' modules, a growing ``DynamicCache`` (a ``torch.cat`` per layer per token),
one kernel per elementwise op. ``torch.compile`` turns the decoder into a few fused kernels; a static cache
(transformers' ``StaticCache``: preallocated [rows, heads, L, head_dim] buffers written in place at a
tensor-held position) keeps every step's shapes the same, so the step compiles once, and on CUDA the
whole step can be replayed as one CUDA graph (``mode="reduce-overhead"``; on a CPU that mode has nothing
to replay: the default mode, with Inductor's C++ wrapper around the kernels).

Shapes. A step's graph depends on the number of rows R (samples, twice with CFG) and the cache length L.
L is the request's need (longest prompt + new tokens) rounded up to a multiple of ``CACHE_BUCKET`` (and
never past ``max_position_embeddings``), and ``Generator.run`` pads a short last batch to the batch size
with copies of a request whose results it drops, so a run of same-resolution prompts compiles once. Each
(R, L) bucket keeps one ``StaticCache``, reset (zeroed in place) for every batch: the compiled graph sees
the same buffers every time (CUDA graphs need fixed addresses).

The prompt (prefill) runs eagerly into the same static cache, as transformers recommends: its length
varies with every batch and it runs once per batch. Compilation happens in a warm-up on the bucket's own
cache before the first batch, so its time is logged on its own (``compiled the decode step ... in X s``);
Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, default under the system temp dir) makes a second
run's warm-up a cache hit. If compiling fails (no C++ compiler for Inductor's CPU code, an unsupported
platform or backend), one warning line says so and decoding goes on eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from transformers import ChameleonConfig, StaticCache

logger = logging.getLogger(__name__)

CACHE_BUCKET = 128  # cache lengths are rounded up to this, so nearby prompt lengths share one graph

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled kernels between runs (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return cache_dir()
    except Exception:  # a private helper: its absence only costs the log line its directory
        return "(Inductor's default cache directory)"


class CompiledDecodeStep:
    """``step(ids [R, 1], mask [R, L], pos [R, 1], cache) -> logits [R, V]``, compiled once per (R, L).

    ``forward`` is the eager step (``Generator._forward``): it is used for the prefill and is what gets
    compiled. ``failed`` holds the reason once compiling has failed; then ``prepare`` returns None and the
    caller decodes eagerly with a dynamic cache.
    """

    def __init__(self, forward: StepFn, config: ChameleonConfig, device: torch.device,
                 max_positions: int):
        self.forward = forward
        self.config = config
        self.device = device
        self.max_positions = max_positions
        # CUDA graphs (reduce-overhead) only where there is a GPU. On a CPU there is nothing to replay: fused C++
        # kernels, and the graph's wrapper in C++ too (cpp_wrapper), which calls them without Python in between
        # (measured here: about 20% less CPU time per token on the bench model, for ~30 s more compiling)
        self.mode = "reduce-overhead" if device.type == "cuda" else None
        options = None if self.mode else {"cpp_wrapper": True}
        # dynamic=False: one static graph per (R, L) bucket instead of a symbolic one after the second shape
        self._step = torch.compile(forward, mode=self.mode, options=options, dynamic=False)
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self.failed: str | None = None
        self.compile_seconds = 0.0

    def cache_len(self, need: int) -> int:
        """The bucketed static cache length for ``need`` positions."""
        return min(self.max_positions, -(-need // CACHE_BUCKET) * CACHE_BUCKET) if need > 0 else CACHE_BUCKET

    def prepare(self, rows: int, length: int) -> StaticCache | None:
        """The (reset) static cache of bucket (rows, length), compiling the step for it on first use; None
        (after one warning) when compiling does not work here."""
        if self.failed is not None:
            return None
        key = (rows, length)
        cache = self._caches.get(key)
        if cache is not None:
            cache.reset()
            return cache
        cache = StaticCache(config=self.config, max_cache_len=length)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                ids = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
                mask = torch.zeros((rows, length), dtype=torch.long, device=self.device)
                pos = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
                mask[:, 0] = 1
                self.forward(ids, mask, pos, cache)  # an eager "prefill" allocates the cache's buffers
                mask[:, 1] = 1
                for _ in range(3 if self.mode == "reduce-overhead" else 1):  # CUDA graphs record on a later call
                    self._step(ids, mask, pos + 1, cache)
        except Exception as e:  # compile errors come as many types (backend, C++ build, unsupported op)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.failed = f"{type(e).__name__}: {first}"
            logger.warning("--compile: torch.compile does not work here (%s); decoding eagerly", self.failed)
            return None
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        logger.info("compiled the decode step for %d rows and a %d-position static cache in %.1fs (mode %s; "
                    "Inductor cache %s)", rows, length, dt, self.mode or "default, C++ wrapper", inductor_cache_dir())
        cache.reset()
        self._caches[key] = cache
        return cache

    def step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        # only the guards that tell the compiled (R, L) buckets apart: every bucket was compiled in prepare()
        # on its own cache with inputs of the step's shapes, dtypes and grad mode, so no other guard can fail
        # (they cost ~0.2 ms a step, 6% of a batch-1 step on the bench model)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            out = self._step(ids, mask, pos, cache)
        # CUDA graphs overwrite their outputs on the next replay: keep our own copy
        return out.clone() if self.mode == "reduce-overhead" else out

"""Which optimizer steps run, and how reproducibly: ``--skip_iterations`` and ``--deterministic``.

Skipped iteration ranges (Megatron's ``--skip-train-iteration-range``). ``--skip_iterations 100-110 300``
names optimizer steps (1-based, as ``step`` in metrics.jsonl; inclusive ranges, a lone number is a range of
one). The global batch of a skipped step is still taken from the sampler, so the data order of every later
step is the one an unskipped run would have had; no forward, backward or update happens, and the learning
rate schedule keeps counting the step (the lr of step 301 is the same with or without the skip). A skipped
step draws no random numbers, writes no metrics.jsonl row (the log says which steps were skipped and what
type of batch they held), and checkpoints taken inside or after a range resume exactly like any other.

Determinism (``--deterministic``): ``torch.use_deterministic_algorithms(True)`` (an op without a
deterministic implementation raises instead of running), and what CUDA needs for it:
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment before CUDA is first used (cuBLAS otherwise picks
workspaces per stream nondeterministically), TF32 off for matmuls and cuDNN, cuDNN in deterministic mode
without autotuning, and scaled-dot-product attention on its math backend only (the flash and memory-
efficient kernels' backward passes accumulate with atomics). On a CPU our runs were reproducible run to
run without it (tests/test_evaluation.py compares two such runs bitwise); the flag makes that a guarantee
and extends it to GPUs (tests/test_run_controls.py: two --deterministic runs with 2 loader workers, one
stopped and resumed, are bitwise equal), at a cost measured in bench/RESULTS.md. Attention then runs the
math kernel on a CPU too, so losses differ in the last digits from a run without the flag.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable

import torch

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
CUBLAS_WORKSPACE = ":4096:8"


class SkipRanges:
    """Inclusive ranges of optimizer steps to skip; ``step in ranges`` tells whether a step is skipped."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = sorted(ranges)

    @classmethod
    def parse(cls, specs: list[str] | None) -> "SkipRanges":
        """``["100-110", "300"]`` -> ranges; ValueError naming the bad spec (bad form, start < 1,
        end < start, overlapping ranges)."""
        ranges = []
        for spec in specs or []:
            m = _RANGE.match(str(spec))
            if not m:
                raise ValueError(f"--skip_iterations {spec!r}: expected START-END or STEP (optimizer steps, "
                                 f"1-based, inclusive), e.g. 100-110")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if lo < 1 or hi < lo:
                raise ValueError(f"--skip_iterations {spec!r}: need 1 <= START <= END (steps are 1-based)")
            ranges.append((lo, hi))
        ranges.sort()
        for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
            if b0 <= a1:
                raise ValueError(f"--skip_iterations: ranges {a0}-{a1} and {b0}-{b1} overlap")
        return cls(ranges)

    def __contains__(self, step: int) -> bool:
        return any(lo <= step <= hi for lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        return " ".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in self.ranges)


def enable_determinism() -> Callable[[], None]:
    """Deterministic algorithms everywhere (see the module docstring). Call before CUDA is first used:
    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its first handle is made. Returns a function that puts
    the previous settings back (for a run inside a longer-lived process, e.g. a test)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    prev = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if prev not in (None, ":4096:8", ":16:8"):
        logger.warning("CUBLAS_WORKSPACE_CONFIG=%s is not one cuBLAS documents as deterministic; using %s",
                       prev, CUBLAS_WORKSPACE)
        prev = None
    if prev is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # attention: the math kernel only (flash / memory-efficient / cuDNN backward passes are not bitwise stable)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
    logger.info("--deterministic: deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=%s, TF32 off, cuDNN "
                "deterministic, math attention", os.environ["CUBLAS_WORKSPACE_CONFIG"])

    def restore() -> None:
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:5]
        for enable, on in zip((torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                               torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_math_sdp), saved[5:9]):
            enable(on)
        if saved[9] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[9]

    return restore

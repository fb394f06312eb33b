"""Shared fixtures. ``tiny_bundle`` (a directory) and ``tiny_tokenizer`` (loaded from it) are built once per
test session by the real generator, so every test exercises the real loading code."""

from __future__ import annotations

import pytest

import torch

from model.tokenizer.tiny_bundle import make_tiny_bundle
from model.tokenizer.bundle import ChameleonTokenizer


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Path of a tiny tokenizer bundle (seed 0): text_tokenizer.json, vqgan.yaml, vqgan.ckpt. Read-only."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bundle):
    """ChameleonTokenizer (with its VQGAN, on CPU) loaded from ``tiny_bundle``. Do not mutate."""
    return ChameleonTokenizer.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny VQGAN's convolutions are so short that 2 threads on a 2-core machine shared with other jobs
    stall on each other (~10x slower); the codes do not depend on it. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

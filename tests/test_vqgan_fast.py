"""The VQGAN encoder's CPU fast path (model/tokenizer/vqgan_fast.py) computes exactly what the modules compute."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.tokenizer import vqgan_fast
from model.tokenizer.vqgan import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Every block kind of taming's Encoder: attention inside a level (16 px), a channel change (nin_shortcut
# 1x1 conv), strided downsampling with its pad, the mid-block attention, conv_out + quant_conv.
SMALL = VQGANConfig(embed_dim=8, n_embed=64, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, double_z=False)


@pytest.fixture(scope="module")
def vq() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(SMALL).eval().requires_grad_(False).use_channels_last()


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def modules_z(vq: VQGAN, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vq.quant_conv(vq.encoder(x.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 32, 48), (1, 3, 64, 32)])
def test_fast_encoder_gives_bitwise_the_modules_z(vq, shape):
    fast = vqgan_fast.FastEncoder(vq.encoder, vq.quant_conv)
    x = pixels(*shape)
    with torch.no_grad():
        assert fast.supports(x)
        for _ in range(2):  # the first call checks each fused conv, the second runs from the caches
            assert torch.equal(fast(x), modules_z(vq, x))


def test_fast_encoder_stays_bitwise_when_the_thread_count_changes(vq):
    # torch/oneDNN choose kernels by thread count (a 1x1 conv is a matmul at 1 thread, oneDNN at 2).
    fast = vqgan_fast.FastEncoder(vq.encoder, vq.quant_conv)
    x = pixels(1, 3, 32, 32, seed=5)
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with torch.no_grad():
                assert torch.equal(fast(x), modules_z(vq, x))
    finally:
        torch.set_num_threads(1)


def test_encode_codes_are_the_same_with_and_without_the_fast_path(vq, tiny_tokenizer):
    x = pixels(3, 3, 32, 48, seed=1)
    fast = vq.encode(x)
    vq.fast_encode = False
    try:
        assert torch.equal(vq.encode(x), fast)
    finally:
        vq.fast_encode = True
    assert vq._fast._packs, "the fast path was not taken"
    tiny = tiny_tokenizer.vqgan  # Chameleon's 5-level layout, no res blocks
    y = pixels(2, 3, 64, 64, seed=2)
    assert torch.equal(tiny.encode(y), tiny.quantize.codes(modules_z(tiny, y)))


def test_new_weights_are_used_not_stale_packed_copies(vq):
    other = copy.deepcopy(vq)
    x = pixels(1, 3, 32, 32, seed=3)
    before = other.encode(x)
    torch.manual_seed(1)
    other.load_state_dict(VQGAN(SMALL).state_dict())
    after = other.encode(x)
    assert torch.equal(after, other.quantize.codes(modules_z(other, x)))
    assert not torch.equal(after, before)


def test_packed_weights_are_kept_for_a_bounded_number_of_shapes(vq, monkeypatch):
    monkeypatch.setattr(vqgan_fast, "PACK_CACHE_SHAPES", 2)
    fast = vqgan_fast.FastEncoder(vq.encoder, vq.quant_conv)
    with torch.no_grad():
        for h in (32, 48, 64, 32):
            x = pixels(1, 3, h, 32, seed=h)
            assert torch.equal(fast(x), modules_z(vq, x))
    assert [k[:4] for k in fast._packs] == [(1, 3, 64, 32), (1, 3, 32, 32)]


def test_inputs_the_fast_path_cannot_take_run_the_modules(vq):
    fast = vq._fast
    assert not fast.supports(pixels(1, 3, 32, 32).double())
    with torch.enable_grad():
        assert not fast.supports(pixels(1, 3, 32, 32))
    nchw = VQGAN(SMALL).eval()  # channels_last off: encode keeps the modules' own NCHW path
    x = pixels(1, 3, 32, 32, seed=4)
    with torch.no_grad():
        assert torch.equal(nchw.encode(x), nchw.quantize.codes(nchw.quant_conv(nchw.encoder(x))))
    assert not nchw._fast._packs


# ------------------------------------------------------------------- bench/bench_pretokenize.py's loop

def test_benchmark_lumina_loop_gives_the_same_tokens_and_labels_as_ours(tiny_bundle, tiny_tokenizer, tmp_path):
    from bench.bench_pretokenize import LuminaLoop, make_images
    from data.item_processor import ItemProcessor
    from model.tokenizer.vqgan import load_vqgan

    # Square inputs: Lumina's random crop offset is 0 there, so both pipelines see the same pixels.
    items = json.loads(make_images(tmp_path, 3, 96).read_text())
    nchw = load_vqgan(tiny_bundle / "vqgan.yaml", tiny_bundle / "vqgan.ckpt", channels_last=False)
    lumina = LuminaLoop(tiny_tokenizer, nchw, target_size=64)
    ours = ItemProcessor(tiny_tokenizer, 64)
    for item in items:
        tokens, labels, blocks = lumina.process_item(item, tmp_path)
        assert (tokens, labels) == ours.process_item(item, tmp_path)
        assert len(blocks) == 1 and len(tiny_tokenizer.parse_image_block(blocks[0]).ravel()) == 16


def test_benchmark_refuses_cuda_without_a_gpu(capsys):
    from bench.bench_pretokenize import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda"])
    assert e.value.code == 2 and "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_reuse_freed_memory_ends_the_page_faults_of_the_encoders_activations():
    # In a child process: mallopt is process-wide. 512 px: the tiny encoder's first activations are
    # 32 x 512 x 512 float32 = 32 MB, which glibc maps and unmaps afresh on every call by default.
    code = """if True:
        import resource, torch
        from model.tokenizer.tiny_bundle import TINY_VQGAN
        from model.tokenizer.vqgan import VQGAN
        from model.tokenizer.vqgan_fast import reuse_freed_memory
        torch.set_num_threads(1)
        vq, x = VQGAN(TINY_VQGAN).eval().use_channels_last(), torch.zeros(1, 3, 512, 512)
        def faults():
            vq.encode(x)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            vq.encode(x)
            vq.encode(x)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        plain = faults()
        assert reuse_freed_memory()
        faults()
        print(plain, faults())
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    plain, reused = map(int, out.stdout.split())
    assert plain > 20000 and reused < plain / 20, (plain, reused)

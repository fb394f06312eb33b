"""model/tokenizer/vqgan_fit.py through make_tiny_bundle(fit_images=...): a short fit on a few tiny pictures
reconstructs them better than the unfitted VQGAN, and the bundle it writes loads with the normal loaders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.tiny_bundle import TINY_VQGAN, build_tiny_vqgan, make_tiny_bundle
from model.tokenizer.vqgan import VQGANConfig, load_vqgan
from model.tokenizer.vqgan_fit import FitConfig, load_fit_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = [(220, 40, 40), (40, 70, 220), (235, 205, 40), (40, 170, 60)]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Eight 64x64 pictures: a coloured disc or box on white or black."""
    folder = tmp_path_factory.mktemp("pictures")
    for i in range(8):
        img = Image.new("RGB", (64, 64), (250, 250, 250) if i % 2 else (15, 15, 15))
        d = ImageDraw.Draw(img)
        box = [14 + i, 12, 50, 48 - i]
        (d.ellipse if i % 4 < 2 else d.rectangle)(box, fill=COLOURS[i // 2])
        img.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not a picture: skipped")
    return folder


def _mse(bundle, images) -> float:
    vq = load_vqgan(bundle / "vqgan.yaml", bundle / "vqgan.ckpt")  # the normal loader: fast encoder on CPU
    return float(np.mean([((vq.decode(vq.encode(x[None])) - x[None]) ** 2).mean().item() for x in images]))


def test_a_short_fit_reconstructs_better_than_the_unfitted_vqgan_and_loads_normally(pictures, tiny_bundle,
                                                                                    tmp_path):
    images = load_fit_images(pictures)
    assert len(images) == 8 and images[0].shape == (3, 64, 64) and float(images[0].min()) >= -1
    fitted = make_tiny_bundle(tmp_path / "fitted", seed=0, fit_images=pictures,
                              fit=FitConfig(steps=40, batch_size=4, min_scale=1.0, restart_every=8), progress=False)
    before, after = _mse(tiny_bundle, images), _mse(fitted, images)
    assert after < 0.7 * before, (before, after)
    print(f"reconstruction PSNR {10 * math.log10(4 / before):.1f} dB unfitted -> {10 * math.log10(4 / after):.1f}")
    # same text tokenizer and vqgan.yaml bytes as the unfitted bundle; same layout and code count
    for name in ("text_tokenizer.json", "vqgan.yaml"):
        assert (fitted / name).read_bytes() == (tiny_bundle / name).read_bytes()
    assert VQGANConfig.from_yaml(fitted / "vqgan.yaml") == TINY_VQGAN and TINY_VQGAN.n_embed == 8192
    assert (fitted / "vqgan.ckpt").read_bytes() != (tiny_bundle / "vqgan.ckpt").read_bytes()
    tok = ChameleonTokenizer.from_bundle(fitted)  # the bundle loader, VQGAN included
    codes = tok.vqgan.encode(images[0][None])
    assert codes.shape == (1, 4, 4) and tok.decode_codes(codes[0]).shape == (3, 64, 64)


def test_fit_images_without_pictures_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no readable images"):
        load_fit_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_fit_images(tmp_path / "missing")


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_a_mean_only_stream_bakes_into_plain_group_norms_that_compute_the_same(pictures, side):
    """The fit trains the encoder and the decoder with mean-only norms on their streams; bake() must turn them back
    into taming's GroupNorms (what every loader builds) that compute the same thing, on unseen inputs too."""
    from model.tokenizer.vqgan_fit import _MeanOnlyStream

    vq = build_tiny_vqgan(0)
    coder = getattr(vq, side)
    g = torch.Generator().manual_seed(0)
    if side == "encoder":
        inputs = [x[None] for x in load_fit_images(pictures)]
        unseen = torch.rand(1, 3, 96, 64, generator=g) * 2 - 1
    else:  # latents of the decoder's input shape
        inputs = [torch.randn(1, TINY_VQGAN.z_channels, 4, 4, generator=g) for _ in range(8)]
        unseen = torch.randn(1, TINY_VQGAN.z_channels, 6, 4, generator=g)
    plain = coder(inputs[0]).detach()
    stream = _MeanOnlyStream(coder)
    with torch.no_grad():
        before = [coder(x) for x in inputs]
        before_unseen = coder(unseen)
    assert not torch.allclose(before[0], plain, atol=1e-3)  # mean-only is another function than the plain norm
    stream.bake(inputs[:4])
    assert all(type(getattr(owner, name)) is torch.nn.GroupNorm for owner, name in stream.norms)
    assert len(stream.norms) == (4 if side == "encoder" else 4 + len(TINY_VQGAN.ch_mult))
    with torch.no_grad():
        for x, y in zip(inputs, before):
            torch.testing.assert_close(coder(x), y, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(coder(unseen), before_unseen, rtol=1e-3, atol=1e-4)
    assert set(vq.state_dict()) == set(build_tiny_vqgan(0).state_dict())  # taming's keys, nothing added


@pytest.fixture(scope="module")
def short_fit_state(pictures, tmp_path_factory) -> dict:
    """The state dict of a 6-step fit (half autoencoder, half quantized) of the tiny VQGAN to the pictures."""
    fitted = make_tiny_bundle(tmp_path_factory.mktemp("short_fit") / "fitted", seed=0, fit_images=pictures,
                              fit=FitConfig(steps=6, batch_size=2, min_scale=1.0, warmup_frac=0.5), progress=False)
    return torch.load(fitted / "vqgan.ckpt", weights_only=True)["state_dict"]


def test_a_fit_keeps_each_code_to_its_neighbourhood(short_fit_state):
    """local_codes: the encoder's middle convs and conv_out keep only their centre taps and the attention adds
    nothing, through a fit that moves every other weight; so a code reads its own patch and ~8 pixels around."""
    sd = short_fit_state
    fresh = build_tiny_vqgan(0).state_dict()
    for key in ("encoder.mid.block_1.conv1.weight", "encoder.mid.block_1.conv2.weight",
                "encoder.mid.block_2.conv1.weight", "encoder.mid.block_2.conv2.weight", "encoder.conv_out.weight"):
        w = sd[key]
        assert w.shape[-2:] == (3, 3), key  # taming's 3x3 kernels, as saved
        outer = w.clone()
        outer[..., 1, 1] = 0
        assert not outer.any() and w[..., 1, 1].any(), key
        assert not torch.equal(w[..., 1, 1], fresh[key][..., 1, 1]), key  # the centre was trained
    assert not sd["encoder.mid.attn_1.proj_out.weight"].any() and not sd["encoder.mid.attn_1.proj_out.bias"].any()
    assert not torch.equal(sd["encoder.conv_in.weight"], fresh["encoder.conv_in.weight"])


def test_a_fit_keeps_the_decoders_paired_output_channels_equal(short_fit_state):
    sd = short_fit_state
    half = TINY_VQGAN.ch * TINY_VQGAN.ch_mult[0] // 2
    for key in ("decoder.up.1.upsample.conv.weight", "decoder.up.1.upsample.conv.bias",
                "decoder.up.0.block.0.conv2.weight", "decoder.up.0.block.0.conv2.bias"):
        assert torch.equal(sd[key][:half], sd[key][half:]), key
    fresh = build_tiny_vqgan(0).state_dict()
    assert not torch.equal(sd["decoder.up.0.block.0.conv2.weight"], fresh["decoder.up.0.block.0.conv2.weight"])

"""model/tokenizer/vqgan_fit.py through make_tiny_bundle(fit_images=...): a short fit on a few tiny pictures
reconstructs them better than the unfitted VQGAN, and the bundle it writes loads with the normal loaders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model.tokenizer.bundle import ChameleonTokenizer
from model.tokenizer.tiny_bundle import TINY_VQGAN, make_tiny_bundle
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

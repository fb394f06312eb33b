"""Image loading and Lumina-mGPT's variable-aspect preprocessing: PIL image -> float32 [3, H, W] in [-1, 1].

    img = load_image("cat.jpg")                  # EXIF orientation applied, modes normalised, bombs refused
    pixels = preprocess_image(img, 512)          # e.g. [3, 512, 512] or [3, 384, 672]
    pixels = preprocess_image(img, 512, fit="pad")   # the whole image, padded to the chosen size

Steps, as in Lumina-mGPT's ``var_center_crop`` + Chameleon's image processor (see DESIGN "One training
sequence"): pick the crop size on a 32-px grid whose aspect ratio is closest to the image's, halve with BOX
while both sides are >= 2x the crop, BICUBIC-resize to cover the crop, crop at the centre (Lumina picks a
random offset; ours is deterministic), composite transparency onto white, scale to [-1, 1].

``fit="pad"`` (``--image_fit pad``) keeps the whole image instead: same choice of size, then the image is
resized to fit inside it and centred on a canvas of LLaVA's padding colour (``expand2square`` /
xtuner's ``pad_image_to_square``, generalised from a square to the chosen 32-px grid size).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

PATCH = 32            # crop sizes are multiples of 32 px (one size token unit, 2x2 VQ codes)
MAX_ASPECT = 4.0      # long side / short side of a crop
# A resize intermediate larger than this many times the crop means an absurd aspect ratio (e.g. a
# 20000x10 strip would be upscaled to 1024x512000 before cropping); such images are refused.
MAX_UPSCALE_AREA = 64
FITS = ("crop", "pad")
# LLaVA's expand2square and xtuner's pad_image_to_square pad with the vision processor's image_mean,
# i.e. CLIP's (0.48145466, 0.4578275, 0.40821073), as tuple(int(x * 255) ...).
PAD_COLOR = (122, 116, 104)


class ImageLoadError(ValueError):
    """An image cannot be used: missing, empty, truncated, corrupt, a decompression bomb, or unusable mode."""


@lru_cache(maxsize=None)
def _crop_sizes(target_size: int, patch: int, max_ratio: float) -> tuple[tuple[int, int], ...]:
    num_patches = (target_size // patch) ** 2
    sizes = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((wp * patch, hp * patch))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return tuple(sizes)


def crop_sizes(target_size: int, patch: int = PATCH, max_ratio: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """All maximal (w, h) on a ``patch`` grid with (w/patch)*(h/patch) <= (target/patch)^2 and aspect <= 4.

    Lumina's order (widest first). 49 sizes for 512, 73 for 768, 97 for 1024.
    """
    if target_size < patch or target_size % patch:
        raise ValueError(f"target size must be a positive multiple of {patch}, got {target_size}")
    return list(_crop_sizes(target_size, patch, max_ratio))


def choose_crop(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (w, h) whose aspect is closest to the image's: max of min(cw/w, ch/h) / max(cw/w, ch/h).

    Ties go to the larger (w, h) tuple, as Lumina's ``sorted(..., reverse=True)[0]`` does.
    """
    scored = ((min(cw / width, ch / height) / max(cw / width, ch / height), (cw, ch)) for cw, ch in sizes)
    return max(scored)[1]


def center_crop(img: Image.Image, crop: tuple[int, int]) -> Image.Image:
    """BOX-halve while both sides >= 2x the crop, BICUBIC-resize to cover it, cut the centre."""
    cw, ch = crop
    while img.size[0] >= 2 * cw and img.size[1] >= 2 * ch:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = max(cw / img.size[0], ch / img.size[1])
    new_size = tuple(round(x * scale) for x in img.size)
    if new_size[0] * new_size[1] > MAX_UPSCALE_AREA * cw * ch:
        raise ImageLoadError(f"aspect ratio {img.size[0]}x{img.size[1]} is too extreme: covering the "
                             f"{cw}x{ch} crop would need a {new_size[0]}x{new_size[1]} intermediate image")
    img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = (img.size[0] - cw) // 2
    top = (img.size[1] - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def pad_to_fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """BOX-halve while both sides >= 2x the fitted size, BICUBIC-resize to fit inside ``size`` keeping the
    aspect ratio, centre on a ``PAD_COLOR`` canvas of ``size`` (alpha kept, so transparency still goes to
    white afterwards; the padding is opaque)."""
    cw, ch = size
    scale = min(cw / img.size[0], ch / img.size[1])
    fitted = (min(cw, max(1, round(img.size[0] * scale))), min(ch, max(1, round(img.size[1] * scale))))
    mode = "RGBA" if "A" in img.mode else "RGB"
    img = img.convert(mode)
    while img.size[0] >= 2 * fitted[0] and img.size[1] >= 2 * fitted[1]:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    img = img.resize(fitted, resample=Image.Resampling.BICUBIC)
    canvas = Image.new(mode, size, PAD_COLOR + ((255,) if mode == "RGBA" else ()))
    canvas.paste(img, ((cw - fitted[0]) // 2, (ch - fitted[1]) // 2))
    return canvas


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]. With any alpha < 255: (1 - a) * 255 + a * rgb, a = alpha / 255 in float64,
    truncated to uint8 (Chameleon's ``_whiten_transparency``); else a plain RGB conversion."""
    if img.mode == "RGB":
        return np.asarray(img)
    rgba = np.asarray(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return np.asarray(img.convert("RGB"))
    alpha = rgba[:, :, 3:4] / 255.0
    return ((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype(np.uint8)


def pixels_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: (x / 255) * 2 - 1 computed in float64, then cast."""
    return np.ascontiguousarray(((rgb / 255.0) * 2 - 1).astype(np.float32).transpose(2, 0, 1))


def preprocess_image(img: Image.Image, target_size: int, fit: str = "crop") -> np.ndarray:
    """PIL image (as from ``load_image``) -> float32 [3, H, W] in [-1, 1], H and W multiples of 32.

    ``fit``: ``crop`` (Lumina's: cover the chosen size, cut the centre) or ``pad`` (fit inside, pad)."""
    if fit not in FITS:
        raise ValueError(f"image fit must be one of {', '.join(FITS)}, got {fit!r}")
    size = choose_crop(img.size[0], img.size[1], crop_sizes(target_size))
    return pixels_from_rgb(to_rgb_array(center_crop(img, size) if fit == "crop" else pad_to_fit(img, size)))


def to_pil(pixels) -> Image.Image:
    """float [3, H, W] in [-1, 1] (ndarray or tensor) -> RGB image (for viewing decoded codes).

    Rounds, so it inverts ``pixels_from_rgb`` exactly (Chameleon's ``_pil_from_chw_tensor`` truncates).
    """
    arr = pixels.detach().cpu().numpy() if hasattr(pixels, "detach") else np.asarray(pixels)
    hwc = (np.clip(arr.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
    return Image.fromarray(np.round(hwc.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------- loading


def _normalize_mode(img: Image.Image) -> Image.Image:
    """Palette/1-bit/16-bit/float/YCbCr/... -> L, LA, RGB or RGBA (which resize like Lumina's inputs).

    CMYK stays CMYK: Lumina resizes it as it is and converts to RGB after the crop (``to_rgb_array``), and
    PIL's CMYK -> RGB clips, so converting first gives other pixels (and codes; the golden Lumina outputs'
    CMYK item, tests/test_lumina_golden.py)."""
    mode = img.mode
    if mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return img
    if mode == "1":
        return img.convert("RGB")
    if mode in ("P", "PA"):
        return img.convert("RGBA")  # keeps palette transparency; resizing a palette would be nearest-neighbour
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data (I;16*, or "I" with values above 255) scales by 255/65535; PIL's own convert("L")
        # would clip everything above 255 to white.
        if mode != "I" or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    try:
        return img.convert("RGBA" if "A" in mode else "RGB")  # YCbCr, HSV, RGBX, ...
    except ValueError as e:
        raise ImageLoadError(f"image mode {mode} cannot be converted to RGB ({e})") from e


def _exif_transpose(img: Image.Image, label: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (ValueError, OSError, SyntaxError, struct.error, KeyError, TypeError) as e:
        logger.warning("%s: unreadable EXIF orientation ignored (%s: %s)", label, type(e).__name__, e)
        return img


def check_source(src: str | os.PathLike | bytes, name: str | None, error: type[Exception]) -> str:
    """The label of a media source for messages (``name``, else the path or ``<N bytes>``); raises
    ``error`` for a missing path, a path that is not a file, or an empty file or buffer."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or f"<{len(src)} bytes>"
        if len(src) == 0:
            raise error(f"{label}: empty (0 bytes)")
        return label
    label, path = name or str(src), Path(src)
    if not path.is_file():
        raise error(f"{label}: no such file" if not path.exists() else f"{label}: not a file")
    if path.stat().st_size == 0:
        raise error(f"{label}: empty file (0 bytes)")
    return label


def load_image(src: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Reads an image file (path) or encoded image (bytes) fully; EXIF orientation applied; mode L, LA,
    RGB, RGBA or CMYK. Raises ImageLoadError naming ``name`` (default: the path) and what is wrong.

    Images over ``PIL.Image.MAX_IMAGE_PIXELS`` are refused (PIL itself only warns below twice that). The
    warning filter this uses is process-wide: call it from processes, not from several threads at once.
    """
    label = check_source(src, name, ImageLoadError)
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src)
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                im.load()
                img = _exif_transpose(im, label)
                if img is im:
                    img = im.copy()
        return _normalize_mode(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{label}: refused as a decompression bomb: {e} (the limit is PIL's "
                             f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels)") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{label}: not an image PIL can identify (corrupt or unsupported format)") from e
    except ImageLoadError as e:
        raise ImageLoadError(f"{label}: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError) as e:
        raise ImageLoadError(f"{label}: cannot decode the image ({type(e).__name__}: {e})") from e

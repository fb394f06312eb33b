"""Writes small video files with PyAV for the video tests and the benchmark: frame i is a known image."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frame_image(i: int, w: int, h: int) -> np.ndarray:
    """uint8 [h, w, 3]: red = 12 * i (the frame's index, readable back after lossy coding), a fixed
    green gradient, a fixed vertical gradient in blue (n <= 21 keeps red below 256)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (12 * i) % 256
    arr[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 2] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return arr


def make_video(path: Path, n: int = 20, w: int = 64, h: int = 48, fps: int = 10, codec: str = "mpeg4",
               gop: int | None = None, rotation: int = 0, hflip: bool = False) -> Path:
    """A clip of ``n`` frames (``frame_image(i)``) at ``fps`` encoded with ``codec`` (a keyframe every
    ``gop`` frames if given); container by suffix. ``rotation`` (degrees counter-clockwise) and ``hflip`` go
    into the display matrix, as phones write it: the pixels stay as they are."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation or hflip:
            s.set_display_rotation(rotation, hflip=hflip)
        s.bit_rate = 4_000_000  # near-lossless, so frame_index reads the index back from lossy codecs
        if gop:
            s.codec_context.gop_size = gop
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_image(i, w, h), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_audio_only(path: Path, seconds: float = 0.5) -> Path:
    """A file with one audio stream and no video stream."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = int(8000 * seconds)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def frame_index(img) -> int:
    """The index a decoded frame of ``make_video`` was made from (its mean red / 12, rounded)."""
    return int(round(float(np.asarray(img)[..., 0].mean()) / 12))

"""Video items: which frames of a clip become image blocks, decoded with PyAV (FFmpeg's maintained binding).

    sampling = VideoSampling(frames=8)                     # --video_frames 8 (or fps=1.0, max_frames=32)
    frames, indices = load_video_frames("clips/a.mp4", sampling)   # PIL RGB images in time order + their indices

Frame choice depends on the file alone (never on timing, threads or what else is being decoded), so a
video item pre-tokenizes to the same tokens for any ``--batch_size``, ``--num_workers`` or re-run:

- The frames of the first video stream are counted and timed by demuxing (no decoding): frame ``i`` is
  the i-th packet in presentation (pts) order, its time ``t_i`` is its pts minus the first one's.
- ``--video_frames K`` (default): indices ``np.linspace(0, n - 1, K, dtype=int)`` over the ``n`` frames,
  as LLaVA-NeXT-Video and xtuner's video datasets sample (first and last frame included). A video with
  fewer than K frames is rejected.
- ``--video_fps F``: times ``k / F`` (k = 0, 1, ...) up to the last frame's time; when that is more than
  ``--video_max_frames``, that many times spread evenly from the first to the last frame's time instead.
  Each time takes the frame shown then (the last frame starting at or before it); a frame is taken once.
- Then the chosen frames are decoded, converted to RGB (``rgb24``) and turned upright as the file's display
  matrix says (phone videos store "rotate 90" there instead of rotating the pixels; FFmpeg's players
  apply it, like EXIF orientation for images): forward from the start, except that
  in MP4/MOV and Matroska/WebM files, a chosen frame whose keyframe lies beyond what is decoded already
  is reached by seeking to that keyframe (same pixels, without decoding the frames in between; a seek
  that lands after its target falls back to decoding from the start). A chosen frame that does not
  decode (a truncated or damaged file) rejects the item.

Refused with :class:`VideoLoadError` (the item goes to errors.jsonl, reason ``video``): missing or 0-byte
file, not a container FFmpeg can open, no video stream, frames larger than PIL's
``Image.MAX_IMAGE_PIXELS``, more than ``MAX_VIDEO_FRAMES`` frames or ``MAX_VIDEO_SECONDS`` seconds, fewer
decodable frames than asked, truncated (an MP4/MOV cut short does not open; a file holding fewer frames
than its header counts, or ending more than two frame intervals before the duration it declares, as a
cut Matroska/WebM does; a raw stream cut short, e.g. MPEG-TS, declares nothing and is read as what is
left). PyAV is imported on first use: it is the ``video`` extra
(``pip install -e .[video]``), needed only when an item has a ``"video"``.
"""

from __future__ import annotations

import bisect
import gc
import io
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.image_preprocess import check_source

logger = logging.getLogger(__name__)

# An hour and a half at 60 fps, or a day at any rate: beyond, the clip is certainly not a training sample
# (and demuxing it would take minutes of the worker's time).
MAX_VIDEO_FRAMES = 324_000
MAX_VIDEO_SECONDS = 24 * 3600.0
# Containers whose seek goes through an index to a keyframe (FFmpeg demuxer names); in others (MPEG-TS,
# raw streams) a seek is a guess, so they are decoded from the start.
SEEKABLE_FORMATS = ("mov", "mp4", "matroska", "webm")


class VideoLoadError(ValueError):
    """A video cannot be used: missing, empty, not a video, no video stream, truncated, too few frames,
    absurd size or length. The message names the file."""


@dataclass(frozen=True)
class VideoSampling:
    """How frames are chosen and sized: ``frames`` uniformly over the clip, or ``fps`` (capped at
    ``max_frames``); each frame is preprocessed like an image at ``target_size``."""

    frames: int = 8
    fps: float | None = None
    max_frames: int = 32
    target_size: int = 256


def _import_av():
    try:
        import av
    except ImportError as e:
        raise VideoLoadError("reading video needs PyAV, which is not installed: pip install -e .[video] "
                             "(or pip install av)") from e
    return av


def choose_frames(times: list[float], sampling: VideoSampling) -> list[int]:
    """Indices of the frames to take, from the frames' start times (seconds, ascending, first is 0)."""
    n = len(times)
    if sampling.fps is None:
        if n < sampling.frames:
            raise VideoLoadError(f"has {n} frame(s), fewer than the {sampling.frames} asked (--video_frames)")
        return [int(i) for i in np.linspace(0, n - 1, sampling.frames, dtype=int)]
    last = times[-1]
    count = int(np.floor(last * sampling.fps + 1e-9)) + 1
    if count > sampling.max_frames:
        targets = np.linspace(0.0, last, sampling.max_frames)
    else:
        targets = np.arange(count) / sampling.fps
    chosen: list[int] = []
    for t in targets:
        i = max(0, bisect.bisect_right(times, float(t) + 1e-9) - 1)
        if not chosen or chosen[-1] != i:
            chosen.append(i)
    return chosen


def _check_complete(label: str, times: list[float], declared_frames: int, declared: float | None) -> None:
    """A file cut short still opens and demuxes: compare what is there with what its header declares
    (the frame count, as MP4/MOV store it; else the duration, allowing two frame intervals of slack)."""
    n = len(times)
    if declared_frames and n < declared_frames:
        raise VideoLoadError(f"{label}: truncated: {n} of the {declared_frames} frames its header declares")
    if declared and n > 1:
        interval = times[-1] / (n - 1)
        end = times[-1] + interval
        if end + 2 * interval < declared:
            raise VideoLoadError(f"{label}: truncated: its frames end at {end:.2f} s, but it declares "
                                 f"{declared:.2f} s")


def display_transforms(matrix) -> list:
    """The PIL transposes (or an angle, clockwise degrees) that show a frame upright, from its display matrix
    (9 int32, 16.16 fixed point, as FFmpeg's side data holds it), chosen exactly as FFmpeg's autorotate
    (fftools: ``get_rotation`` then transpose / hflip / vflip / rotate)."""
    a, b, c, d = (matrix[0] / 65536, matrix[1] / 65536, matrix[3] / 65536, matrix[4] / 65536)
    s0, s1 = math.hypot(a, c), math.hypot(b, d)
    if s0 == 0 or s1 == 0:
        return []
    theta = -round(-math.degrees(math.atan2(b / s1, a / s0)))  # av_display_rotation_get, then get_rotation
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    T = Image.Transpose
    if abs(theta - 90) < 1:
        return [T.TRANSPOSE if c > 0 else T.ROTATE_270]          # cclock_flip / clock
    if abs(theta - 180) < 1:
        return ([T.FLIP_LEFT_RIGHT] if a < 0 else []) + ([T.FLIP_TOP_BOTTOM] if d < 0 else [])
    if abs(theta - 270) < 1:
        return [T.TRANSVERSE if c < 0 else T.ROTATE_90]          # clock_flip / cclock
    if abs(theta) > 1:
        return [float(theta)]                                    # FFmpeg's rotate filter: same size, black
    return [T.FLIP_TOP_BOTTOM] if d < 0 else []


def _upright(av, frame) -> Image.Image:
    """The frame as an RGB image, turned as its display matrix says (none: as decoded).

    ``frame.rotation`` reads the matrix in C; only a frame that is turned has its side data read in Python,
    because PyAV's side-data container and the frame refer to each other: such a frame is freed by the
    cyclic GC, not at once, and a process forked while it waits (a worker pool) hangs or crashes freeing
    it (seen in the test suite). ``load_video_frames`` collects those cycles before returning. A matrix
    that only mirrors vertically has rotation 0 and is not applied."""
    img = frame.to_image()
    if not frame.rotation:
        return img
    for sd in frame.side_data:
        if sd.type == av.sidedata.sidedata.Type.DISPLAYMATRIX and sd.buffer_size >= 36:
            for t in display_transforms(np.frombuffer(bytes(sd), "<i4", 9)):
                img = img.rotate(-t, resample=Image.Resampling.BILINEAR) if isinstance(t, float) else img.transpose(t)
    return img


def _decode_chosen(av, container, stream, targets: list[int], keys: list[int]) -> list | None:
    """RGB images of the frames whose pts are ``targets`` (ascending), None where one does not decode.

    Decoding runs forward; when the keyframe at or before the next target (from ``keys``, the keyframes'
    pts; empty: never seek) is past the last decoded frame, it seeks there first instead of decoding the
    frames in between. That gives the same pixels: a frame shown after a keyframe never refers to frames
    before it. Returns None if a seek lands after its target (a bad index): the caller decodes from the
    start instead.
    """
    frames: list = [None] * len(targets)
    it, cur, pos, seeked = None, None, None, False
    for k, t in enumerate(targets):
        j = bisect.bisect_right(keys, t) - 1
        if j >= 0 and (pos is None and it is None and j > 0 or pos is not None and keys[j] > pos):
            container.seek(keys[j], stream=stream, backward=True)
            it, cur, seeked = container.decode(stream), None, True
        elif it is None:
            it = container.decode(stream)
        while True:
            if cur is None:
                cur = next(it, None)
                if cur is None:
                    break  # the stream ended before this target
                if seeked and cur.pts is not None and cur.pts > t:
                    return None
                seeked = False
                if cur.pts is None:
                    cur = None
                    continue
                pos = cur.pts
            if cur.pts < t:
                cur = None
                continue
            if cur.pts == t:
                frames[k], cur = _upright(av, cur), None
            break  # cur.pts > t: this target did not decode; cur may be the next one
    return frames


def _open(av, src, label: str):
    try:
        return av.open(io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else str(src),
                       mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeError) as e:
        raise VideoLoadError(f"{label}: not a video FFmpeg can open: not a video, or damaged or truncated "
                             f"({type(e).__name__}: {e})") from e


def load_video_frames(src: str | os.PathLike | bytes, sampling: VideoSampling,
                      name: str | None = None) -> tuple[list[Image.Image], list[int]]:
    """The chosen frames of ``src`` (a path or the file's bytes) as RGB images in time order, with their
    frame indices. Raises VideoLoadError naming ``name`` (default: the path) and what is wrong."""
    label = check_source(src, name, VideoLoadError)
    av = _import_av()

    # Pass 1: demux only, to count and time the frames.
    with _open(av, src, label) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoLoadError(f"{label}: no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w <= 0 or h <= 0:
            raise VideoLoadError(f"{label}: the video stream has no frame size ({w}x{h})")
        if w * h > Image.MAX_IMAGE_PIXELS:
            raise VideoLoadError(f"{label}: frames of {w}x{h} pixels are absurdly large (more than PIL's "
                                 f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})")
        tb = float(stream.time_base) if stream.time_base is not None else 0.0
        declared_frames = int(stream.frames or 0)
        if stream.duration:
            declared = float(stream.duration * stream.time_base)
        elif container.duration and all(st.type == "video" for st in container.streams):
            declared = container.duration / av.time_base
        else:
            declared = None
        stamps, keys = [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    continue
                stamps.append(int(ts))
                if packet.is_keyframe:
                    keys.append(int(ts))
                if len(stamps) > MAX_VIDEO_FRAMES:
                    raise VideoLoadError(f"{label}: more than {MAX_VIDEO_FRAMES} frames: absurdly long for a "
                                         f"training clip")
        except av.FFmpegError as e:
            raise VideoLoadError(f"{label}: damaged container ({type(e).__name__}: {e})") from e
    if not stamps:
        raise VideoLoadError(f"{label}: the video stream has no frames (empty or truncated video)")
    stamps.sort()
    times = [(s - stamps[0]) * tb for s in stamps]
    _check_complete(label, times, declared_frames, declared)
    if times[-1] > MAX_VIDEO_SECONDS:
        raise VideoLoadError(f"{label}: {times[-1]:.0f} s long: absurdly long for a training clip (more "
                             f"than {MAX_VIDEO_SECONDS:.0f} s)")
    try:
        chosen = choose_frames(times, sampling)
    except VideoLoadError as e:
        raise VideoLoadError(f"{label}: {e}") from None
    # Pass 2: decode the chosen frames (see _decode_chosen).
    targets = [stamps[i] for i in chosen]
    with _open(av, src, label) as container:
        stream = container.streams.video[0]
        seekable = any(n in SEEKABLE_FORMATS for n in container.format.name.split(","))
        try:
            frames = _decode_chosen(av, container, stream, targets, sorted(keys) if seekable else [])
        except av.FFmpegError as e:
            raise VideoLoadError(f"{label}: cannot decode (truncated or damaged video: "
                                 f"{type(e).__name__}: {e})") from e
    if frames is None:  # a seek landed after its target: decode from the start instead
        with _open(av, src, label) as container:
            try:
                frames = _decode_chosen(av, container, container.streams.video[0], targets, [])
            except av.FFmpegError as e:
                raise VideoLoadError(f"{label}: cannot decode (truncated or damaged video: "
                                     f"{type(e).__name__}: {e})") from e
    gc.collect(1)  # frames whose side data was read (see _upright) are young cyclic garbage: free them now
    missing = [chosen[k] for k, f in enumerate(frames) if f is None]
    if missing:
        raise VideoLoadError(f"{label}: {len(chosen) - len(missing)} of the {len(chosen)} chosen frames "
                             f"decode; frame(s) {missing[:5]} of {len(stamps)} do not (truncated or damaged "
                             f"video)")
    return frames, chosen

"""One conversation item -> (tokens, labels), token for token as Lumina-mGPT builds them.

    tok = ChameleonTokenizer.from_bundle(bundle_dir)
    proc = ItemProcessor(tok, target_size=512)
    tokens, labels = proc.process_item({"conversations": [{"from": "human", "value": "<|image|> What is this?"},
                                                         {"from": "gpt", "value": "A cat."}],
                                        "image": ["cat.jpg"]}, base_dir=Path("data"))

The sequence (DESIGN "One training sequence"): ``<s>`` once, then each turn's message followed by
``<reserved08706>``, no EOS, no role names. Labels are -100 except on assistant turns (their ids including
the trailing ``<reserved08706>``). Each ``<|image|>`` in a message is replaced by the image's block
(``<racm3:break>``, height and width size tokens, rows of codes each ending in ``<reserved08799>``,
``<eoss>``), labelled exactly when the marker is in an assistant turn; the text on each side of a marker is
encoded as written. With images but no marker, ``"<|image|> "`` per image goes in front of the first turn.

Videos (``"video": path | [paths]``, markers ``<|video|>`` or LLaVA's ``<video>``, mixed freely with images):
each video's frames are chosen and decoded as :mod:`data.inputs.video` says and preprocessed like images at
``video.target_size``; its marker is replaced by the frames' image blocks back to back, in time order, with
nothing between them (so a video of K frames tokenizes exactly like K adjacent ``<|image|>`` markers with
those frames as images). With videos but no video marker, ``"<|video|> "`` per video goes in front of the
first turn (ahead of any prepended image markers). In items without ``"video"`` the markers are plain text.
``image_fit="pad"`` keeps whole images (see :func:`data.image_preprocess.preprocess_image`).

Pre-tokenization runs in two steps so the VQGAN can batch images across items on one device:
``prepare`` (worker processes: validation, text encoding, image loading and preprocessing; no VQGAN) and
``assemble`` (splices the codes in). ``process_item`` does both for one item.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data.image_preprocess import FITS, ImageLoadError, crop_sizes, load_image, preprocess_image
from data.inputs.video import VideoLoadError, VideoSampling, load_video_frames
from data.records import IGNORE_INDEX
from model.tokenizer.bundle import EOT, ChameleonTokenizer

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<|image|>"
VIDEO_MARKER = "<|video|>"
LLAVA_VIDEO_MARKER = "<video>"
_IMAGE_SPLIT = re.compile(f"({re.escape(IMAGE_MARKER)})")
_MEDIA_SPLIT = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ItemError(ValueError):
    """An item that cannot become a training sequence; the message says what is wrong with it."""


@dataclass
class PreparedItem:
    """An item with its text encoded and its images preprocessed, waiting for VQ codes. Picklable.

    Image ``k``'s block goes between ``segments[k]`` and ``segments[k + 1]``.
    """

    segments: list[list[int]]
    segment_labels: list[list[int]]
    images: list[np.ndarray] = field(default_factory=list)  # float32 [3, H, W] in [-1, 1]
    image_labelled: list[bool] = field(default_factory=list)
    image_sources: list[str] = field(default_factory=list)  # path, or "<N bytes>", for messages
    video_frames: list[int] = field(default_factory=list)  # frames of each video, in marker order

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) in pixels of each image."""
        return [(int(im.shape[1]), int(im.shape[2])) for im in self.images]

    def num_tokens(self) -> int:
        """Length of the assembled sequence."""
        return (sum(len(s) for s in self.segments)
                + sum(ChameleonTokenizer.image_block_len(h, w) for h, w in self.image_sizes))


def _role(msg, i: int) -> str:
    if not isinstance(msg, dict):
        raise ItemError(f"conversations[{i}] must be an object with 'from' and 'value', got {type(msg).__name__}")
    if "from" not in msg or "value" not in msg:
        raise ItemError(f"conversations[{i}] needs both 'from' and 'value', has {sorted(msg)}")
    who = msg["from"]
    if not isinstance(who, str) or who.lower() not in HUMAN_ROLES + ASSISTANT_ROLES:
        raise ItemError(f"conversations[{i}]: unknown role {who!r}; expected one of "
                        f"{', '.join(HUMAN_ROLES)} (human side) or {', '.join(ASSISTANT_ROLES)} (assistant side)")
    if not isinstance(msg["value"], str):
        raise ItemError(f"conversations[{i}] ({who}): 'value' must be a string, got {type(msg['value']).__name__}")
    try:
        msg["value"].encode("utf-8")
    except UnicodeEncodeError as e:  # else the text tokenizer fails with "TextInputSequence must be str"
        raise ItemError(f"conversations[{i}] ({who}): 'value' is not valid Unicode text: {e.reason} at character "
                        f"{e.start} (a lone surrogate, e.g. a JSON \\ud800 escape)") from None
    return "human" if who.lower() in HUMAN_ROLES else "assistant"


def _media_entries(item: dict, key: str) -> list:
    raw = item.get(key)
    if raw is None:
        return []
    entries = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    for k, e in enumerate(entries):
        if not isinstance(e, (str, os.PathLike, bytes, bytearray, memoryview)):
            raise ItemError(f"{key} {k}: expected a path or encoded {key} bytes, got {type(e).__name__}")
    return entries


def _source(entry, base_dir) -> tuple[str, object]:
    """(label for messages, what to open): bytes as they are, a relative path against ``base_dir``."""
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return f"<{len(entry)} bytes>", entry
    path = Path(entry)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return str(path), path


class ItemProcessor:
    """Lumina-mGPT's item processing with a ChameleonTokenizer; ``target_size`` as Lumina's (512/768/1024)."""

    def __init__(self, tokenizer: ChameleonTokenizer, target_size: int = 512, image_fit: str = "crop",
                 video: VideoSampling | None = None):
        if image_fit not in FITS:
            raise ValueError(f"image_fit must be one of {', '.join(FITS)}, got {image_fit!r}")
        self.tokenizer = tokenizer
        self.target_size = target_size
        self.image_fit = image_fit
        self.video = video or VideoSampling()
        sizes = crop_sizes(target_size) + crop_sizes(self.video.target_size)
        # Fail at start-up, not on the first unusual aspect ratio, if the vocabulary lacks a size token.
        for n in sorted({s // 32 for wh in sizes for s in wh}):
            tokenizer.size_token_id(n)

    # ------------------------------------------------------------------------------------- prepare

    def prepare(self, item: dict, base_dir: str | os.PathLike | None = None) -> PreparedItem:
        """Validates the conversation, encodes its text, loads and preprocesses its images and video
        frames (no VQGAN)."""
        if not isinstance(item, dict):
            raise ItemError(f"an item must be an object with 'conversations', got {type(item).__name__}")
        conv = item.get("conversations")
        if conv is None:
            raise ItemError(f"item has no 'conversations' (keys: {sorted(item)})" if "conversations" not in item
                            else "'conversations' is null; expected a list of messages")
        if not isinstance(conv, list):
            raise ItemError(f"'conversations' must be a list of messages, got {type(conv).__name__}")
        if not conv:
            raise ItemError("empty conversation: 'conversations' has no messages")
        roles = []
        for i, msg in enumerate(conv):
            role = _role(msg, i)
            expected = "human" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ItemError(f"roles must alternate human, assistant, human, ... starting with human: "
                                f"conversations[{i}] is {msg['from']!r} (a {role} turn) where a {expected} "
                                f"turn belongs")
            roles.append(role)
        values = [msg["value"] for msg in conv]

        images = _media_entries(item, "image")
        n_markers = sum(v.count(IMAGE_MARKER) for v in values)
        if n_markers == 0 and images:
            values[0] = (IMAGE_MARKER + " ") * len(images) + values[0]
        elif n_markers != len(images):
            raise ItemError(f"{n_markers} {IMAGE_MARKER} placeholder(s) in the conversation but "
                            f"{len(images)} image(s) given")
        # Video markers only mean something in an item that has videos: elsewhere "<video>" stays text,
        # so image-only items tokenize exactly as before.
        videos = _media_entries(item, "video")
        if videos:
            values = [v.replace(LLAVA_VIDEO_MARKER, VIDEO_MARKER) for v in values]
            n_video = sum(v.count(VIDEO_MARKER) for v in values)
            if n_video == 0:
                values[0] = (VIDEO_MARKER + " ") * len(videos) + values[0]
            elif n_video != len(videos):
                raise ItemError(f"{n_video} {VIDEO_MARKER} (or {LLAVA_VIDEO_MARKER}) placeholder(s) in the "
                                f"conversation but {len(videos)} video(s) given")

        assistant = [v for v, r in zip(values, roles) if r == "assistant"]
        if not assistant:
            raise ItemError("nothing to train on: the conversation has no assistant (gpt/assistant) turn")
        if all(not v.strip() for v in assistant):
            raise ItemError("nothing to train on: every assistant turn is empty")

        # Text: each part between markers is encoded as written; slots are the markers in order.
        split = _MEDIA_SPLIT if videos else _IMAGE_SPLIT
        segments, seg_labels, slots = [[self.tokenizer.bos_id]], [[IGNORE_INDEX]], []
        for value, role in zip(values, roles):
            labelled = role == "assistant"
            parts = split.split(value)  # text, marker, text, marker, ..., text
            for j in range(0, len(parts), 2):
                last = j == len(parts) - 1
                # The end-of-turn token is encoded with the text, as in Lumina's one-string encoding; the
                # tokenizer splits at added tokens first, so this equals encoding the whole conversation.
                ids = self.tokenizer.encode_text(parts[j] + EOT if last else parts[j])
                segments[-1].extend(ids)
                seg_labels[-1].extend(ids if labelled else [IGNORE_INDEX] * len(ids))
                if not last:
                    slots.append((parts[j + 1] == VIDEO_MARKER, labelled))
                    segments.append([])
                    seg_labels.append([])

        pixels, sources = [], []
        for k, entry in enumerate(images):
            label, src = _source(entry, base_dir)
            try:
                pixels.append(preprocess_image(load_image(src, name=label), self.target_size, self.image_fit))
            except ImageLoadError as e:
                raise ItemError(f"image {k} cannot be used: {e}") from e
            sources.append(label)
        clips = []
        for k, entry in enumerate(videos):
            label, src = _source(entry, base_dir)
            try:
                frames, indices = load_video_frames(src, self.video, name=label)
                clips.append(([preprocess_image(f, self.video.target_size, self.image_fit) for f in frames],
                              [f"{label} frame {i}" for i in indices]))
            except (VideoLoadError, ImageLoadError) as e:
                raise ItemError(f"video {k} cannot be used: {e}") from e
        if not videos:
            return PreparedItem(segments=segments, segment_labels=seg_labels, images=pixels,
                                image_labelled=[lab for _, lab in slots], image_sources=sources)

        # A video's marker becomes its frames' blocks back to back: empty text segments between them.
        out = PreparedItem(segments=[segments[0]], segment_labels=[seg_labels[0]])
        next_image, next_video = iter(zip(pixels, sources)), iter(clips)
        for (is_video, labelled), seg, lab in zip(slots, segments[1:], seg_labels[1:]):
            if is_video:
                frames, names = next(next_video)
            else:
                pix, name = next(next_image)
                frames, names = [pix], [name]
            for f, (pix, name) in enumerate(zip(frames, names)):
                out.images.append(pix)
                out.image_sources.append(name)
                out.image_labelled.append(labelled)
                out.segments.append(seg if f == len(frames) - 1 else [])
                out.segment_labels.append(lab if f == len(frames) - 1 else [])
            if is_video:
                out.video_frames.append(len(frames))
        return out

    # ------------------------------------------------------------------------------------ assemble

    def assemble(self, prepared: PreparedItem,
                 codes: Sequence[np.ndarray | torch.Tensor]) -> tuple[list[int], list[int]]:
        """Splices image blocks built from ``codes[k]`` ([H/16, W/16] per image) into the text."""
        if len(codes) != len(prepared.images):
            raise ItemError(f"{len(prepared.images)} image(s) in the item but {len(codes)} code grid(s) given")
        tokens, labels = list(prepared.segments[0]), list(prepared.segment_labels[0])
        for k, (c, (h, w)) in enumerate(zip(codes, prepared.image_sizes)):
            c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
            if c.shape != (h // 16, w // 16):
                raise ItemError(f"image {k} ({prepared.image_sources[k]}) is {h}x{w} px, so it needs "
                                f"{h // 16}x{w // 16} codes, got {c.shape}")
            block = self.tokenizer.image_block(c)
            tokens += block
            labels += block if prepared.image_labelled[k] else [IGNORE_INDEX] * len(block)
            tokens += prepared.segments[k + 1]
            labels += prepared.segment_labels[k + 1]
        return tokens, labels

    def process_item(self, item: dict, base_dir: str | os.PathLike | None = None) -> tuple[list[int], list[int]]:
        """prepare + VQGAN encoding of the item's images + assemble."""
        prepared = self.prepare(item, base_dir)
        codes = self.tokenizer.encode_images(prepared.images) if prepared.images else []
        return self.assemble(prepared, codes)

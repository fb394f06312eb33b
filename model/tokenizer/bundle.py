"""The Chameleon image+text tokenizer, loaded from a bundle directory as Meta ships it.

A bundle holds ``text_tokenizer.json`` (a ``tokenizers`` BPE), ``vqgan.yaml`` and ``vqgan.ckpt`` (taming
VQGAN). Special tokens are found by name, never by id; image codes are the vocabulary entries named
``IMGIMG<letters>Z`` (letters A..J are the decimal digits of the code).

    tok = ChameleonTokenizer.from_bundle("ckpts/chameleon/tokenizer")   # or a tiny bundle, see below
    ids = tok.encode_text("A red square.")                              # no BOS/EOS added
    codes = tok.encode_images(pixels)                                   # [B, 3, H, W] in [-1, 1] -> [B, H/16, W/16]
    block = tok.image_block(codes[0])                                   # <racm3:break> size size rows... <eoss>
    tok.parse_image_block(block)                                        # -> codes again

A tiny bundle for tests and demos: ``python model/make_tiny_bundle.py --out DIR``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from model.tokenizer import vqgan as vqgan_module
from model.tokenizer.vqgan import VQGAN, BundleError

logger = logging.getLogger(__name__)

BUNDLE_FILES = ("text_tokenizer.json", "vqgan.yaml", "vqgan.ckpt")
HOW_TO_GET_A_BUNDLE = ("A tokenizer bundle is a directory holding text_tokenizer.json, vqgan.yaml and vqgan.ckpt: "
                       "Meta's Chameleon release (Lumina-mGPT keeps it in ckpts/chameleon/tokenizer/), or a tiny "
                       "one for tests and demos made with `python model/make_tiny_bundle.py --out DIR`.")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOI, EOI = "<racm3:break>", "<eoss>"          # image start / end
EOT, EOL = "<reserved08706>", "<reserved08799>"  # end of turn / end of an image row
REQUIRED_TOKENS = (BOS, EOS, PAD, BOI, EOI, EOT, EOL)
SIZE_TOKEN_BASE = 8800                         # <reserved{8800+n}>: image side of n * 32 pixels
PIXELS_PER_SIZE_UNIT = 32
_CODE_NAME = re.compile(r"IMGIMG([A-J]+)Z")
_RESERVED_NAME = re.compile(r"<reserved(\d{5})>")


def size_token_name(n: int) -> str:
    return f"<reserved{SIZE_TOKEN_BASE + n:05d}>"


def code_from_name(name: str) -> int | None:
    """``IMGIMGBCDZ`` -> 123; None for any other entry."""
    m = _CODE_NAME.fullmatch(name)
    if m is None:
        return None
    return int("".join(str(ord(c) - ord("A")) for c in m.group(1)))


class ChameleonTokenizer:
    """Text BPE + VQGAN + the mapping between VQ codes and vocabulary ids.

    ``vqgan`` may be None (``from_bundle(..., load_vqgan=False)`` or ``text_only()``): everything except
    ``encode_images``/``decode_codes`` works, which is what data-loading worker processes need.
    """

    def __init__(self, text_tokenizer: Tokenizer, vqgan: VQGAN | None = None, name: str = "<memory>"):
        self.text_tokenizer = text_tokenizer
        self.vqgan = vqgan
        self.name = name
        self.vocab: dict[str, int] = text_tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in REQUIRED_TOKENS if t not in self.vocab]
        if missing:
            raise BundleError(f"{name}: the vocabulary lacks the special token(s) {', '.join(missing)} "
                              f"(a Chameleon vocabulary needs {', '.join(REQUIRED_TOKENS)}). " + HOW_TO_GET_A_BUNDLE)
        self.bos_id = self.vocab[BOS]
        self.eos_id = self.vocab[EOS]
        self.pad_id = self.vocab[PAD]
        self.boi_id = self.vocab[BOI]
        self.eoi_id = self.vocab[EOI]
        self.eot_id = self.vocab[EOT]
        self.eol_id = self.vocab[EOL]
        self.vocab_size = max(text_tokenizer.get_vocab_size(with_added_tokens=True), max(self.vocab.values()) + 1)

        codes = {}
        for token, i in self.vocab.items():
            c = code_from_name(token)
            if c is not None:
                codes[c] = i
        if not codes:
            raise BundleError(f"{name}: the vocabulary has no image code entries (IMGIMG<letters>Z). "
                              + HOW_TO_GET_A_BUNDLE)
        n_codes = max(codes) + 1
        if len(codes) != n_codes:
            gaps = sorted(set(range(n_codes)) - set(codes))[:5]
            raise BundleError(f"{name}: image codes are not contiguous: {len(codes)} entries up to code "
                              f"{n_codes - 1}, missing e.g. {gaps}")
        self.num_codes = n_codes
        self._code2bpe = np.array([codes[c] for c in range(n_codes)], dtype=np.int64)
        self._bpe2code = np.full(self.vocab_size, -1, dtype=np.int64)
        self._bpe2code[self._code2bpe] = np.arange(n_codes)
        self.image_token_ids: list[int] = sorted(int(i) for i in self._code2bpe)
        self._size_of_id = {i: int(m.group(1)) - SIZE_TOKEN_BASE for t, i in self.vocab.items()
                            if (m := _RESERVED_NAME.fullmatch(t)) and int(m.group(1)) > SIZE_TOKEN_BASE}
        self._device_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if vqgan is not None and vqgan.config.n_embed != n_codes:
            raise BundleError(f"{name}: vqgan.yaml has n_embed={vqgan.config.n_embed}, but the vocabulary has "
                              f"{n_codes} image codes")

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    load_vqgan: bool = True, channels_last: bool | None = None) -> "ChameleonTokenizer":
        """Loads a bundle directory. ``load_vqgan=False`` skips vqgan.ckpt (text-only workers)."""
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise BundleError(f"tokenizer bundle directory {bundle_dir} does not exist. " + HOW_TO_GET_A_BUNDLE)
        needed = BUNDLE_FILES if load_vqgan else BUNDLE_FILES[:1]
        for fname in needed:
            if not (bundle_dir / fname).is_file():
                raise BundleError(f"{bundle_dir / fname} is missing. " + HOW_TO_GET_A_BUNDLE)
        path = bundle_dir / "text_tokenizer.json"
        try:
            text_tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"{path}: not a tokenizers JSON file ({e})") from e
        vqgan = None
        if load_vqgan:
            vqgan = vqgan_module.load_vqgan(bundle_dir / "vqgan.yaml", bundle_dir / "vqgan.ckpt", device=device,
                               channels_last=channels_last)
        return cls(text_tokenizer, vqgan, name=str(bundle_dir))

    def text_only(self) -> "ChameleonTokenizer":
        """The same tokenizer without the VQGAN: cheap to pickle into worker processes."""
        return ChameleonTokenizer(self.text_tokenizer, None, name=self.name)

    # ---------------------------------------------------------------------------------------- text

    def token_id(self, token: str) -> int:
        """Id of a vocabulary entry by name (BundleError if the vocabulary lacks it)."""
        try:
            return self.vocab[token]
        except KeyError:
            raise BundleError(f"{self.name}: the vocabulary has no entry {token!r}") from None

    def size_token_id(self, n: int) -> int:
        """Id of ``<reserved{8800+n}>``, the token for an image side of ``n * 32`` pixels."""
        if n < 1:
            raise ValueError(f"image size token needs n >= 1 (32-px units), got {n}")
        return self.token_id(size_token_name(n))

    def encode_text(self, text: str) -> list[int]:
        """Text -> ids, as written (spaces kept), without BOS/EOS. Control-token strings such as
        ``<reserved08706>`` in the text become their tokens, as in Lumina's one-string encoding."""
        return self.text_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.text_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.text_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # ------------------------------------------------------------------------------- codes <-> ids

    def _maps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_maps:
            self._device_maps[key] = (torch.from_numpy(self._code2bpe).to(device),
                                      torch.from_numpy(self._bpe2code).to(device))
        return self._device_maps[key]

    def codes_to_bpe(self, codes):
        """VQ codes -> vocabulary ids; keeps the container type (Tensor, ndarray, list, int)."""
        if isinstance(codes, torch.Tensor):
            c = codes.long()
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.num_codes):
                raise ValueError(f"codes must lie in [0, {self.num_codes}), got [{int(c.min())}, {int(c.max())}]")
            return self._maps_on(c.device)[0][c]
        arr = np.asarray(codes, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}), got [{arr.min()}, {arr.max()}]")
        out = self._code2bpe[arr]
        if isinstance(codes, np.ndarray):
            return out
        return out.tolist() if arr.ndim else int(out)

    def bpe_to_codes(self, ids):
        """Vocabulary ids of image tokens -> VQ codes; ValueError names the first id that is not one."""
        if isinstance(ids, torch.Tensor):
            i = ids.long()
            bad = (i < 0) | (i >= self.vocab_size)
            codes = torch.full_like(i, -1)
            codes[~bad] = self._maps_on(i.device)[1][i[~bad]]
            if (codes < 0).any():
                first = int(i.flatten()[(codes < 0).flatten()][0])
                raise ValueError(f"id {first} is not an image token")
            return codes
        arr = np.asarray(ids, dtype=np.int64)
        inside = (arr >= 0) & (arr < self.vocab_size)
        codes = np.full(arr.shape, -1, dtype=np.int64)
        codes[inside] = self._bpe2code[arr[inside]]
        if (codes < 0).any():
            raise ValueError(f"id {int(arr[codes < 0].flat[0])} is not an image token")
        if isinstance(ids, np.ndarray):
            return codes
        return codes.tolist() if arr.ndim else int(codes)

    def is_image_token(self, ids):
        """Bool mask (or bool) of which ids are image code tokens."""
        if isinstance(ids, torch.Tensor):
            i = ids.long()
            inside = (i >= 0) & (i < self.vocab_size)
            out = torch.zeros_like(i, dtype=torch.bool)
            out[inside] = self._maps_on(i.device)[1][i[inside]] >= 0
            return out
        arr = np.asarray(ids, dtype=np.int64)
        inside = (arr >= 0) & (arr < self.vocab_size)
        out = np.zeros(arr.shape, dtype=bool)
        out[inside] = self._bpe2code[arr[inside]] >= 0
        return out if arr.ndim else bool(out)

    # -------------------------------------------------------------------------------- image blocks

    def image_block(self, codes) -> list[int]:
        """codes [h, w] (h = H/16, w = W/16) -> ``<racm3:break> <size H/32> <size W/32>``, then each row's
        w code tokens followed by ``<reserved08799>``, then ``<eoss>``. 512x512 pixels: 1060 tokens."""
        arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if arr.ndim != 2 or arr.shape[0] % 2 or arr.shape[1] % 2 or 0 in arr.shape:
            raise ValueError(f"codes must be [h, w] with even non-zero h and w (image sides multiples of 32 px), "
                             f"got shape {arr.shape}")
        h, w = arr.shape
        rows = np.concatenate([self.codes_to_bpe(arr.astype(np.int64)),
                               np.full((h, 1), self.eol_id, dtype=np.int64)], axis=1)
        return [self.boi_id, self.size_token_id(h // 2), self.size_token_id(w // 2),
                *rows.reshape(-1).tolist(), self.eoi_id]

    @staticmethod
    def image_block_len(height: int, width: int) -> int:
        """Tokens in the block of an image of ``height`` x ``width`` pixels (multiples of 32)."""
        return 3 + (height // 16) * (width // 16 + 1) + 1

    def parse_image_block(self, ids) -> np.ndarray:
        """Inverse of ``image_block``: ids (with or without ``<racm3:break>``/``<eoss>``) -> codes [h, w]."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids)]
        if ids and ids[0] == self.boi_id:
            ids = ids[1:]
        if ids and ids[-1] == self.eoi_id:
            ids = ids[:-1]
        if len(ids) < 2 or ids[0] not in self._size_of_id or ids[1] not in self._size_of_id:
            raise ValueError("an image block starts with two size tokens <reserved08801..> (height, width), "
                             f"got {ids[:2]}")
        h, w = 2 * self._size_of_id[ids[0]], 2 * self._size_of_id[ids[1]]
        body = np.asarray(ids[2:], dtype=np.int64)
        if body.size != h * (w + 1):
            raise ValueError(f"an image block of {h}x{w} codes needs {h * (w + 1)} tokens after the size tokens, "
                             f"got {body.size}")
        grid = body.reshape(h, w + 1)
        if (grid[:, -1] != self.eol_id).any():
            row = int(np.nonzero(grid[:, -1] != self.eol_id)[0][0])
            raise ValueError(f"row {row} of the image block does not end with <reserved08799>")
        return self.bpe_to_codes(grid[:, :-1])

    def find_image_blocks(self, ids) -> list[tuple[int, int]]:
        """(start, end) spans, end exclusive, of each ``<racm3:break> ... <eoss>`` in a token sequence."""
        arr = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        starts = np.nonzero(arr == self.boi_id)[0].tolist()
        ends = np.nonzero(arr == self.eoi_id)[0].tolist()
        spans, j = [], 0
        for s in starts:
            while j < len(ends) and ends[j] < s:
                j += 1
            if j == len(ends):
                break
            spans.append((s, ends[j] + 1))
            j += 1
        return spans

    # ------------------------------------------------------------------------------------- pixels

    def _require_vqgan(self) -> VQGAN:
        if self.vqgan is None:
            raise BundleError(f"{self.name}: this tokenizer was loaded without its VQGAN "
                              f"(load_vqgan=False or text_only()); image encoding/decoding needs it")
        return self.vqgan

    def encode_images(self, pixels, batch_size: int = 16):
        """Pixels in [-1, 1] -> VQ codes (LongTensor, CPU).

        ``pixels`` is a Tensor/ndarray [B, 3, H, W] (-> [B, H/16, W/16]) or [3, H, W] (-> [H/16, W/16]),
        or a list of [3, H, W] arrays of any sizes (-> list of [h, w]; same-size images run as one batch).
        """
        vq = self._require_vqgan()
        if isinstance(pixels, (list, tuple)):
            arrays = [torch.as_tensor(p) for p in pixels]
            out: list[torch.Tensor | None] = [None] * len(arrays)
            groups: dict[tuple, list[int]] = {}
            for i, a in enumerate(arrays):
                if a.ndim != 3:
                    raise ValueError(f"image {i}: expected [3, H, W], got {tuple(a.shape)}")
                groups.setdefault(tuple(a.shape), []).append(i)
            for idx in groups.values():
                codes = self.encode_images(torch.stack([arrays[i] for i in idx]), batch_size=batch_size)
                for i, c in zip(idx, codes):
                    out[i] = c
            return out
        x = torch.as_tensor(pixels)
        if x.ndim == 3:
            return self.encode_images(x[None], batch_size=batch_size)[0]
        chunks = [vq.encode(x[s:s + batch_size]).cpu() for s in range(0, x.shape[0], batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, 0, 0, dtype=torch.long)

    def decode_codes(self, codes, batch_size: int = 8) -> torch.Tensor:
        """VQ codes [B, h, w] or [h, w] -> pixels float32 [B, 3, 16h, 16w] or [3, 16h, 16w] in [-1, 1], CPU."""
        vq = self._require_vqgan()
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).long()
        if c.ndim == 2:
            return self.decode_codes(c[None], batch_size=batch_size)[0]
        return torch.cat([vq.decode(c[s:s + batch_size]).cpu() for s in range(0, c.shape[0], batch_size)])

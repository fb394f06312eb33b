"""The VQGAN encoder's CPU fast path: the same arithmetic as taming's ``Encoder`` with less work around it.

It runs when the VQGAN is in channels_last layout, which is opt-in (``load_vqgan(channels_last=True)``,
``pre_tokenize.py --vq_channels_last``): channels_last codes differed from Lumina's NCHW ones on the golden
Lumina outputs (tests/test_lumina_golden.py), so the default is NCHW and this path is off.

``FastEncoder(vqgan.encoder, vqgan.quant_conv)(x)`` returns ``quant_conv(encoder(x))`` for a float32 CPU batch, bit for bit what the
modules compute in channels_last (tests/test_vqgan_fast.py checks z and codes), but without what a
profile of a pre-tokenization run shows costing time outside the convolutions (bench/RESULTS.md):

- **weight reorders**: ``nn.Conv2d`` hands oneDNN a plain OIHW/OHWI weight on every call, and oneDNN
  reorders it to its blocked layout first (30-37 reorders per 256-px image with the real-size encoder,
  one per convolution). Here each weight is reordered once per input shape
  (``torch._C._nn.mkldnn_reorder_conv2d_weight``) and kept in a small LRU cache of ``PACK_CACHE_SHAPES``
  image shapes; a reorder is a copy, so the results do not change;
- **residual adds**: ``x + conv2(h)`` and ``x + proj_out(h)`` become the convolution's ``add`` post-op
  (``torch.ops.mkldnn._convolution_pointwise.binary``): the sum is taken in the conv's output write, in
  float32, one rounding, as before, instead of another pass over a [C, H, W] tensor;
- **GroupNorm + x*sigmoid(x)**: the product is written in place (``h.mul_(torch.sigmoid(h))``), one
  fewer full-size temporary per norm (the same two ATen kernels, so the same bits).

Bit-exactness is checked, not assumed: the first time a convolution meets an input shape, the fused
form and the module both run and the fused form is kept only if the outputs are bitwise equal (torch
sends some convolutions, e.g. 1x1 ones on small inputs, to a matmul instead of oneDNN; those stay
modules). ``reuse_freed_memory()`` (below) removes the other cost the profile shows, page faults.

Things that would change the last bits of z (and so, at a near-tie, a code) are NOT done here: oneDNN's
fused ``swish`` post-op, ``F.silu`` (x / (1 + exp(-x)) rounds differently), ``scaled_dot_product_attention``
for the mid-block attention (its blocked online softmax), folding quant_conv into conv_out, and
torch.compile (Inductor's own GroupNorm and sigmoid). bench/RESULTS.md has their measured effect.

Anything the fast path cannot take (not CPU, not float32, no oneDNN) runs the modules unchanged:
``FastEncoder.supports(x)`` says which.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# Image shapes whose prepacked weights are kept (about the encoder's weight size each: 109 MB for
# Chameleon's). Pre-tokenization encodes a few crop sizes over and over; a shape not in the cache is
# packed on first use, which costs what one unpacked forward spends reordering anyway.
PACK_CACHE_SHAPES = 4


def _have_onednn_ops() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


def _plain(m: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    y = m(x)
    return y if add is None else y.add_(add)  # taming's add + y: the same sum (float + commutes)


class FastEncoder:
    """``quant_conv(encoder(x))`` of a taming ``Encoder`` with prepacked oneDNN weights (see module doc)."""

    def __init__(self, encoder: nn.Module, quant_conv: nn.Conv2d):
        self.encoder, self.quant_conv = encoder, quant_conv
        self.available = _have_onednn_ops()
        self._packs: OrderedDict[tuple, dict[int, torch.Tensor]] = OrderedDict()
        self._key: tuple = ()
        self._cur: dict[int, torch.Tensor] = {}
        self._verified: dict[tuple, bool] = {}  # (conv, shape, add?, threads) -> fused form is bitwise equal

    def __getstate__(self) -> dict:  # copies (deepcopy of the VQGAN) start with empty caches
        return {**self.__dict__, "_packs": OrderedDict(), "_key": (), "_cur": {}, "_verified": {}}

    def supports(self, x: torch.Tensor) -> bool:
        w = self.quant_conv.weight
        return (self.available and x.device.type == "cpu" and x.dtype == torch.float32
                and w.device.type == "cpu" and w.dtype == torch.float32 and not torch.is_grad_enabled())

    # -------------------------------------------------------------------------------------- weights
    def _weights_key(self) -> tuple:
        """Changes when any weight is replaced or written in place (load_state_dict, .to(), copy_)."""
        return tuple((m.weight.data_ptr(), m.weight._version) for m in self._convs())

    def _convs(self):
        yield from (m for m in self.encoder.modules() if isinstance(m, nn.Conv2d))
        yield self.quant_conv

    def _select(self, shape: tuple) -> None:
        key = self._weights_key()
        if key != self._key:
            self._packs.clear()
            self._verified.clear()
            self._key = key
        packs = self._packs.get(shape)
        if packs is None:
            packs = self._packs[shape] = {}
            while len(self._packs) > PACK_CACHE_SHAPES:
                self._packs.popitem(last=False)
        self._packs.move_to_end(shape)
        self._cur = packs

    def _conv(self, m: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``m(x)`` (``+ add``), x and add channels_last float32: through the prepacked weight and the fused
        add when that gives exactly the module's result. torch sends some convolutions elsewhere than
        oneDNN (1x1 ones on small inputs go to a matmul), and oneDNN may pick another kernel for a
        packed weight: so the first call per conv, input shape and add/no-add computes both and keeps
        the fused form only if it is bitwise equal; otherwise that conv keeps using the module."""
        key = (id(m), tuple(x.shape), add is not None, torch.get_num_threads())  # kernels depend on all
        same = self._verified.get(key)
        if same is False:
            return _plain(m, x, add)
        w = self._cur.get(id(m))
        if w is None:
            w = self._cur[id(m)] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                m.weight.contiguous().to_mkldnn(), list(m.padding), list(m.stride), list(m.dilation), m.groups,
                list(x.shape))
        args = (w, m.bias, list(m.padding), list(m.stride), list(m.dilation), m.groups)
        if add is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        else:
            add = add.contiguous(memory_format=torch.channels_last)
            y = torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", 1.0, None, [], None)
        if same is None:
            ref = _plain(m, x, add)
            same = self._verified[key] = torch.equal(y, ref)
            if not same:
                del self._cur[id(m)]
                return ref
        return y

    # -------------------------------------------------------------------------------------- blocks
    @staticmethod
    def _norm_swish(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return h.mul_(torch.sigmoid(h))  # taming's x * sigmoid(x), written in place

    def _resnet(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = self._conv(blk.conv1, self._norm_swish(blk.norm1, x))
        h = self._norm_swish(blk.norm2, h)  # dropout: identity in eval
        if blk.in_channels != blk.out_channels:
            x = self._conv(blk.conv_shortcut if blk.use_conv_shortcut else blk.nin_shortcut, x)
        return self._conv(blk.conv2, h, add=x)

    def _attn(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h_ = blk.norm(x)
        q, k, v = self._conv(blk.q, h_), self._conv(blk.k, h_), self._conv(blk.v, h_)
        b, c, h, w = q.shape  # taming's AttnBlock, op for op
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w))
        w_ = torch.nn.functional.softmax(w_ * (int(c) ** (-0.5)), dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return self._conv(blk.proj_out, h_.contiguous(memory_format=torch.channels_last), add=x)

    def _down(self, ds: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if ds.with_conv:
            return self._conv(ds.conv, F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [B, C, H, W] on CPU (any layout) -> z = quant_conv(encoder(x)), channels_last."""
        enc = self.encoder
        x = x.contiguous(memory_format=torch.channels_last)
        self._select((*x.shape, torch.get_num_threads()))
        # taming keeps every level's output in a list ``hs`` (the full model's decoder-style skips);
        # the encoder only ever reads the last one, so only that one is kept alive here.
        h = self._conv(enc.conv_in, x)
        for i_level in range(enc.num_resolutions):
            for i_block in range(enc.num_res_blocks):
                h = self._resnet(enc.down[i_level].block[i_block], h)
                if len(enc.down[i_level].attn) > 0:
                    h = self._attn(enc.down[i_level].attn[i_block], h)
            if i_level != enc.num_resolutions - 1:
                h = self._down(enc.down[i_level].downsample, h)
        h = self._resnet(enc.mid.block_1, h)
        h = self._attn(enc.mid.attn_1, h)
        h = self._resnet(enc.mid.block_2, h)
        h = self._conv(enc.conv_out, self._norm_swish(enc.norm_out, h))
        return self._conv(self.quant_conv, h)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def reuse_freed_memory() -> bool:
    """Lets glibc keep freed memory for the next allocation instead of returning it to the kernel.

    By default glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap
    and unmaps it on free. The encoder's activations are that large (128 x 256 x 256 float32 = 32 MB for
    a 256-px image, 128 MB at 512 px), so every op's output is new memory that the kernel must fault in
    and zero page by page: 115k page faults and 0.4 s of system time per 256-px image with the real-size
    encoder, about a sixth of its CPU time (bench/RESULTS.md). With allocations up to 1 GiB served from
    the heap and the heap not trimmed below 1 GiB, the same image takes 0 page faults after the first.
    Arithmetic is unchanged. The cost: the process keeps its peak memory until it exits, which is what
    a pre-tokenization process wants. Process-wide, so callers opt in (pre_tokenize.py on CPU). Returns
    whether glibc accepted it (False on other C libraries, where nothing changes).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False

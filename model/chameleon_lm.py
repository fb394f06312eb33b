"""The model the trainer optimises: transformers' Chameleon decoder and head, our loss, our dropout.

``ChameleonLM`` holds the two trainable submodules of ``ChameleonForConditionalGeneration`` under the same
attribute names (``model`` = ``ChameleonModel`` without its VQ model, ``lm_head``), so its state-dict keys
are exactly the HF keys (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``) and an HF export
is a plain ``save_pretrained``. transformers' modelling code is used unchanged; what differs is:

Loss (``LMHeadWithLoss``). transformers' ``forward(labels=...)`` sets every image-code logit to the
float minimum before the loss, so any labelled image code gives an (effectively) infinite loss and
text-to-image training is impossible. We call the decoder ourselves and compute, over labelled positions
only (target = ``labels[:, t+1]`` != -100, predicted from position t):

    ce     = logsumexp(logits) - logits[target]            (summed; "closs" = ce / #labelled tokens)
    z_loss = logsumexp(logits) ** 2                         (summed; reported as the mean over the tokens)
    loss   = (ce + z_loss_weight * z_loss) / #labelled tokens of the global batch

Image-logit masking (``--mask_image_logits``). Lumina-mGPT sets the image-code logits to the float
minimum at *every* position (its ``mask_image_logits``), which is only usable for image-to-text data: a
labelled image code then costs ~3.4e38. We mask the image-code logits exactly at the positions whose
target is *text* (not an image code): there the model is trained to put no mass on image codes, as in
Lumina; positions whose target is an image code keep the full vocabulary. For data without labelled image
codes this is bit-for-bit Lumina's loss; with them it stays finite. ``--unmask_image_logits`` (what
Lumina's exps use) trains over the full vocabulary everywhere. z-loss is taken over the same (masked)
logits, as in Lumina.

Memory. The head never materialises the [tokens, vocab] fp32 logits: ``_ChunkedHeadLoss`` walks the
labelled rows in chunks of ``loss_chunk_size``; per chunk it computes the logits (in the weight's dtype,
cast to fp32), the loss terms, and right away their gradients with respect to the chunk's hidden states
and the head weight (softmax * (1 + 2 * z_w * lse) - onehot, then two matmuls). Backward only scales these
saved gradients. That is the recomputation-free variant of checkpointing each chunk
(``torch.utils.checkpoint`` around each chunk would redo the [chunk, hidden] x [hidden, vocab] matmul in
backward, a third more head FLOPs; on a small model with a 65k vocabulary the head is most of the step).
Peak extra memory is a few [chunk, vocab] fp32 buffers plus a [vocab, hidden] fp32 gradient accumulator;
bench/bench_loss_memory.py measures it against the naive computation.

q/k norms. Lumina-mGPT trains one q-norm and one k-norm affine per model-parallel shard, shared by that
shard's heads; transformers holds one per head. When ``config.qk_norm_groups`` records a grouping (the
trainer decides it from the checkpoint), each layer's ``q_norm`` / ``k_norm`` is replaced by
``model.qk_norm.GroupedQKNorm`` ([groups, head_dim], same state-dict keys), so training keeps Lumina's
parameterisation; see model/qk_norm.py and model/lumina_layout.py.

Dropout (``--dropout``). Lumina adds ``residual + dropout(sublayer(x))`` to each decoder layer. We get the
same without copying transformers' layer code: forward hooks on each layer's attention and MLP output
(for ``swin_norm`` layers, on the post-sublayer norms, which is where Lumina's swin layer drops out),
active only in ``train()`` mode. Activation checkpointing replays them with the same RNG state.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from model.qk_norm import NORM_KEY_RE, QKNormLayoutError, fit_qk_norm, install_grouped_qk_norms

logger = logging.getLogger(__name__)

IMAGE_TOKEN_PREFIX = "IMGIMG"  # how the vocabulary names image codes (transformers uses the same rule)
IGNORE_INDEX = -100
DEFAULT_LOSS_CHUNK = 1024
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ModelLoadError(RuntimeError):
    """An --init_from directory or hub id that cannot be turned into a Chameleon model (says which, why)."""


# ----------------------------------------------------------------------------------------------------------
# vocabulary


def image_token_ids(config: ChameleonConfig) -> torch.Tensor:
    """Sorted ids of all image-code tokens (vocabulary names starting with ``IMGIMG``)."""
    vm = config.vocabulary_map or {}
    ids = sorted(int(v) for k, v in vm.items() if k.startswith(IMAGE_TOKEN_PREFIX))
    return torch.tensor(ids, dtype=torch.long)


def _as_range(ids: torch.Tensor) -> tuple[int, int] | None:
    """(lo, hi) when ``ids`` is exactly lo..hi-1 (true for Chameleon: 4..8195), else None."""
    if ids.numel() == 0:
        return None
    lo, hi = int(ids[0]), int(ids[-1]) + 1
    return (lo, hi) if hi - lo == ids.numel() else None


# ----------------------------------------------------------------------------------------------------------
# the loss


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over rows of (ce + z_w * lse^2) for logits = hidden @ weight.T, never holding all logits.

    Inputs: hidden [N, H] (rows with a target), weight [V, H], targets [N], text_rows [N] bool or None
    (rows where image-code logits are masked), image_cols ((lo, hi) or LongTensor), z_w, chunk.
    Returns (total, ce_sum, z_sum); only ``total`` carries gradient. Gradients are computed in forward,
    chunk by chunk, and only scaled in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, text_rows, image_cols, z_w: float, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows = hidden.shape[0]
        dev = hidden.device
        ce_sum = torch.zeros((), dtype=torch.float32, device=dev)
        z_sum = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator across chunks; for an fp32 weight it is the gradient itself
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            h, t = hidden[s:e], targets[s:e]
            logits = torch.mm(h, weight.t()).float()  # [n, V] fp32, one chunk only
            if text_rows is not None:
                _mask_image_cols_(logits, text_rows[s:e], image_cols)
            # logsumexp by hand, in place: torch.logsumexp would allocate two more [n, V] temporaries
            tgt_logit = logits.gather(1, t[:, None]).squeeze(1)
            row_max = logits.max(dim=1).values
            logits.sub_(row_max[:, None]).exp_()  # now exp(logit - max); masked entries are exactly 0
            sum_exp = logits.sum(dim=1)
            lse = row_max + sum_exp.log()
            ce_sum += (lse - tgt_logit).sum()
            z_sum += lse.square().sum()
            if need_h or need_w:
                # d(ce + z_w * lse^2)/dlogits = softmax * (1 + 2 z_w lse) - onehot(target), in place
                logits.mul_(((1.0 + 2.0 * z_w * lse) / sum_exp)[:, None])
                logits.scatter_add_(1, t[:, None], torch.full((e - s, 1), -1.0, device=dev))
                g = logits.to(weight.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[s:e])
                if need_w:
                    if weight.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w.add_(torch.mm(g.t(), h))
                del g  # for fp32 weights g aliases logits: drop both before the next chunk is allocated
            del logits
        total = ce_sum + z_w * z_sum
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce_sum, z_sum)
        return total, ce_sum, z_sum

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_z):
        grad_h, grad_w = ctx.saved_tensors
        if getattr(ctx, "used", False):
            raise RuntimeError("the chunked head loss scales its saved gradients in place; "
                               "backward through it runs once (no retain_graph)")
        ctx.used = True
        gh = grad_h * g_total.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w.mul_(g_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def _mask_image_cols_(logits: torch.Tensor, rows: torch.Tensor, image_cols) -> None:
    """Sets logits[rows, image_cols] = -inf in place (softmax then gives them exactly 0)."""
    if isinstance(image_cols, tuple):
        lo, hi = image_cols
        logits[:, lo:hi].masked_fill_(rows[:, None], -math.inf)
    else:
        cols = image_cols.to(logits.device)
        sub = logits.index_select(1, cols)
        sub.masked_fill_(rows[:, None], -math.inf)
        logits.index_copy_(1, cols, sub)


class LossParts(NamedTuple):
    """One micro-batch: ``loss`` (differentiable, already multiplied by the caller's ``loss_scale``),
    and the detached sums ``ce_sum``, ``z_sum`` over ``n_tokens`` labelled tokens."""

    loss: torch.Tensor
    ce_sum: torch.Tensor
    z_sum: torch.Tensor
    n_tokens: torch.Tensor


class LMHeadWithLoss(nn.Linear):
    """``lm_head`` (same weight, same state-dict key) whose forward can also return the chunked loss.

    ``forward(hidden)`` gives logits as nn.Linear does; ``forward(hidden, labels, loss_scale)`` gives
    ``LossParts``. Being one module call per micro-batch matters under FSDP: the head's parameters are
    gathered once, not once per chunk.
    """

    def __init__(self, in_features: int, out_features: int, *, image_ids: torch.Tensor,
                 mask_image_logits: bool, z_loss_weight: float, chunk_size: int = DEFAULT_LOSS_CHUNK,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.mask_image_logits = mask_image_logits
        self.z_loss_weight = float(z_loss_weight)
        self.chunk_size = int(chunk_size)
        self._image_ids = image_ids.cpu()  # plain attribute: not a buffer, not in the state dict
        self._image_range = _as_range(self._image_ids)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "LMHeadWithLoss":
        with torch.device("meta"):
            head = cls(linear.in_features, linear.out_features, **kw)
        head.weight = linear.weight
        return head

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        if self._image_range is not None:
            lo, hi = self._image_range
            return (ids >= lo) & (ids < hi)
        return torch.isin(ids, self._image_ids.to(ids.device))

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                loss_scale: float | torch.Tensor = 1.0):
        if labels is None:
            return F.linear(hidden, self.weight)
        bsz, seqlen, hdim = hidden.shape
        # position t predicts labels[:, t + 1]; keep only positions whose target is labelled
        tgt = labels[:, 1:]
        b_idx, t_idx = (tgt != IGNORE_INDEX).nonzero(as_tuple=True)
        rows = b_idx * seqlen + t_idx
        targets = tgt[b_idx, t_idx]
        h = hidden.reshape(bsz * seqlen, hdim).index_select(0, rows).to(self.weight.dtype)
        text_rows = None
        image_cols = None
        if self.mask_image_logits and self._image_ids.numel():
            text_rows = ~self.is_image_token(targets)
            image_cols = self._image_range if self._image_range is not None else self._image_ids
        total, ce_sum, z_sum = _ChunkedHeadLoss.apply(h, self.weight, targets, text_rows, image_cols,
                                                      self.z_loss_weight, self.chunk_size)
        n = torch.tensor(targets.numel(), dtype=torch.long, device=hidden.device)
        return LossParts(total * loss_scale, ce_sum, z_sum, n)


def naive_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, image_ids: torch.Tensor,
                  mask_image_logits: bool, z_loss_weight: float) -> LossParts:
    """Reference: the same loss from full logits [B, L, V] (what the chunked head must equal)."""
    logits = logits[:, :-1].float()
    tgt = labels[:, 1:]
    valid = tgt != IGNORE_INDEX
    lg = logits[valid]
    t = tgt[valid]
    if mask_image_logits and image_ids.numel():
        text = ~torch.isin(t, image_ids.to(t.device))
        col = torch.zeros(lg.shape[1], dtype=torch.bool, device=lg.device)
        col[image_ids.to(lg.device)] = True
        lg = lg.masked_fill(text[:, None] & col[None, :], -math.inf)
    lse = torch.logsumexp(lg, dim=1)
    ce = F.cross_entropy(lg, t, reduction="sum")
    z = lse.square().sum()
    return LossParts(ce + z_loss_weight * z, ce.detach(), z.detach(),
                     torch.tensor(t.numel(), device=lg.device))


# ----------------------------------------------------------------------------------------------------------
# dropout


def add_residual_dropout(decoder: nn.Module, p: float, swin_norm: bool) -> list:
    """Lumina's residual dropout via forward hooks: returns the hook handles (remove() to undo)."""
    if p <= 0:
        return []

    def hook(module, _args, output):
        if not module.training:
            return None
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    handles = []
    for layer in decoder.layers:
        targets = ((layer.input_layernorm, layer.post_attention_layernorm) if swin_norm
                   else (layer.self_attn, layer.mlp))
        handles += [m.register_forward_hook(hook) for m in targets]
    return handles


# ----------------------------------------------------------------------------------------------------------
# the module


class ChameleonLM(nn.Module):
    """Training view of ``ChameleonForConditionalGeneration``: ``model`` (decoder, no VQ model) and
    ``lm_head`` with the same parameter names; ``forward`` returns ``LossParts``."""

    def __init__(self, hf_model: ChameleonForConditionalGeneration, *, mask_image_logits: bool = True,
                 z_loss_weight: float = 0.0, dropout: float = 0.0, loss_chunk_size: int = DEFAULT_LOSS_CHUNK):
        super().__init__()
        self.config = hf_model.config
        if hasattr(hf_model.model, "vqmodel"):
            del hf_model.model.vqmodel  # the VQ model is frozen and unused: images arrive as codes
        self.model = hf_model.model
        install_grouped_qk_norms(self.model, self.config)  # Lumina's [groups, head_dim] q/k norms, if recorded
        self.lm_head = LMHeadWithLoss.from_linear(
            hf_model.lm_head, image_ids=image_token_ids(self.config), mask_image_logits=mask_image_logits,
            z_loss_weight=z_loss_weight, chunk_size=loss_chunk_size)
        self.dropout_handles = add_residual_dropout(self.model, dropout, bool(self.config.swin_norm))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, loss_scale: float | torch.Tensor = 1.0) -> LossParts:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return self.lm_head(hidden, labels, loss_scale)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits [B, L, V] (no masking); for tests and small evaluations on an unsharded model."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.lm_head(hidden)

    def reset_nonpersistent_buffers(self, device: torch.device | str) -> None:
        """Recomputes buffers that are not in the state dict (the rotary frequencies): after building on
        the meta device and ``to_empty``, they hold garbage."""
        self.model.rotary_emb = ChameleonRotaryEmbedding(self.config).to(device)


def build_chameleon_lm(config: ChameleonConfig, *, device: str | torch.device = "cpu", **loss_kw) -> ChameleonLM:
    """A ``ChameleonLM`` with transformers' random init (``device="meta"``: no memory, for FSDP to
    materialise shard by shard). ``loss_kw``: mask_image_logits, z_loss_weight, dropout, loss_chunk_size."""
    with torch.device(device):
        hf = ChameleonForConditionalGeneration(config)
    return ChameleonLM(hf, **loss_kw)


# ----------------------------------------------------------------------------------------------------------
# loading HF-format weights


def resolve_hf_dir(name_or_path: str) -> Path:
    """A local directory for ``--init_from``: the path itself, or a hub snapshot (config + safetensors)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"--init_from {name_or_path}: no config.json in this directory; expected an "
                                 f"HF-format Chameleon checkpoint (save_pretrained output)")
        return p
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelLoadError(f"--init_from {name_or_path}: no such directory (and not a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise ModelLoadError(f"--init_from {name_or_path}: not a local directory and downloading it from the "
                             f"Hugging Face hub failed ({type(e).__name__}: {e})") from e


def load_hf_config(hf_dir: Path) -> ChameleonConfig:
    cfg_path = Path(hf_dir) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_path}: cannot read the model config ({e})") from e
    return config_from_dict(raw, where=str(cfg_path))


def config_from_dict(raw: dict, where: str = "config") -> ChameleonConfig:
    raw = dict(raw)
    if raw.get("model_type") not in (None, "chameleon"):
        logger.warning("%s: model_type %r, reading it as a Chameleon config", where, raw.get("model_type"))
    raw.pop("model_type", None)
    raw.pop("architectures", None)
    for extra in ("mask_image_logits", "dropout", "z_loss_weight"):  # Lumina's config extras: trainer flags
        raw.pop(extra, None)
    if not raw.get("vocabulary_map") or "<image>" not in raw["vocabulary_map"]:
        raise ModelLoadError(f"{where}: 'vocabulary_map' must map token names to ids and contain '<image>' "
                             f"(transformers' Chameleon needs it); make the checkpoint with "
                             f"model/make_tiny_model.py or transformers' conversion script")
    cfg = ChameleonConfig(**raw)
    cfg._attn_implementation = "sdpa"
    return cfg


def _weight_files(hf_dir: Path) -> list[Path]:
    st = sorted(hf_dir.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ModelLoadError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weight files")


def _read_tensors(hf_dir: Path, want) -> dict[str, torch.Tensor]:
    """The tensors (CPU, stored dtype) of an HF dir whose key passes ``want(key)``."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(hf_dir)):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if want(k):
                        out[k] = sf.get_tensor(k)
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # code in the file, or damage
                raise ModelLoadError(f"{f}: cannot be read as a torch checkpoint with weights_only=True (refused: "
                                     f"it would need more than tensors, or it is damaged): "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            out.update({k: v for k, v in sd.items() if want(k)})
    return out


def only_model_keys(tensors: dict[str, torch.Tensor], want: set[str], where: str) -> dict[str, torch.Tensor]:
    """``tensors`` restricted to the model's keys ``want``: ModelLoadError (naming ``where``) when some are
    missing, a warning for those the model does not have."""
    missing = sorted(want - set(tensors))
    if missing:
        raise ModelLoadError(f"{where}: the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    extra = sorted(set(tensors) - want)
    if extra:
        logger.warning("%s: ignoring %d weights the model does not have, e.g. %s", where, len(extra), extra[:3])
    return {k: v for k, v in tensors.items() if k in want}


def read_hf_weights(hf_dir: Path, config: ChameleonConfig, *, with_vq: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (CPU, stored dtype) by HF key. VQ-model keys are dropped unless ``with_vq``.

    The attention q/k LayerNorm weights and biases come in the shapes a model built from ``config`` holds
    (``model.qk_norm.qk_norm_shapes``): Lumina-mGPT stores them as [model_parallel_size, head_dim],
    transformers as [heads, head_dim]; either is regrouped exactly (``fit_qk_norm``) or refused.
    """
    out = _read_tensors(Path(hf_dir), lambda k: with_vq or ".vqmodel." not in k)
    try:
        return {k: fit_qk_norm(k, v, config) for k, v in out.items()}
    except QKNormLayoutError as e:
        raise ModelLoadError(f"{hf_dir}: {e}") from e


def read_vq_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Only the VQ model's tensors (``model.vqmodel.*``) of an HF dir, as stored; {} when it has none (Lumina's
    7B releases keep none). ModelLoadError or OSError when the dir cannot be read."""
    return _read_tensors(Path(hf_dir), lambda k: ".vqmodel." in k)


def read_qk_norms(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Only the attention q/k norm tensors of an HF dir, as stored (for deciding their grouping)."""
    return _read_tensors(Path(hf_dir), lambda k: NORM_KEY_RE.match(k) is not None)


# ----------------------------------------------------------------------------------------------------------
# Lumina's starting point


def zero_image_head(src: str | Path, dst: str | Path) -> Path:
    """Copies an HF-format Chameleon dir to ``dst`` with the image-code rows of ``lm_head.weight`` zeroed.

    This is Lumina-mGPT's starting-point preparation (``_make_and_save_starting_point``): at the start of
    fine-tuning every image code has logit 0. Works on any HF dir (safetensors) without loading the model:
    only the shard holding ``lm_head.weight`` is rewritten, the other files are copied.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    config = load_hf_config(src)
    ids = image_token_ids(config)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{src}: zero_image_head needs safetensors weight files")
    tmp = dst.with_name(f".tmp-{dst.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    found = False
    for item in sorted(src.iterdir()):
        if item.suffix != ".safetensors":
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
            continue
        with safe_open(str(item), framework="pt") as sf:
            if "lm_head.weight" not in sf.keys():
                shutil.copy2(item, tmp / item.name)
                continue
            meta = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        tensors["lm_head.weight"][ids] = 0
        save_file(tensors, str(tmp / item.name), metadata={**meta, "format": meta.get("format", "pt")})
        found = True
    if not found:
        shutil.rmtree(tmp)
        raise ModelLoadError(f"{src}: no lm_head.weight in its safetensors files")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    logger.info("starting point %s: %d image-code rows of lm_head zeroed", dst, ids.numel())
    return dst

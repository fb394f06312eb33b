"""Memory and compute plan of a training run, per rank, without GPUs or a process group (``--plan``).

    python finetune_solver.py --plan --model_size 34B --batch_size 8 --max_seq_len 4096 --checkpointing \\
        --world_size 32 --gpu_memory_gb 80 --gpu H100 --mfu 0.4 [--json]

What it owns: turning the flags of a run and a cluster shape into the bytes each rank holds at its
peak, a verdict against the GPU's memory, FLOPs / step time / tokens per second at a stated MFU, and,
when the run does not fit, the nearest settings that do. Nothing here touches data, weights or devices.

How each term is obtained (P = parameters, W = world size, b = bytes of the compute dtype of
``--precision``, B x S = ``--batch_size`` x ``--max_seq_len``, every position labelled: the worst case):

- Model: ``ChameleonLM`` built on the meta device from ``--init_from``'s config.json or a ``--model_size``
  preset (``PRESETS``). Parameter counts and shapes are the real ones, whatever the config.
- FSDP2 units: the units of ``model/training/parallelize.py`` (embeddings, each decoder layer, the head, the root
  holding the final norm). ``fully_shard`` splits each parameter on dim 0 into W chunks of
  ceil(d0 / W) rows and keeps that padded chunk on every rank, so a rank holds
  ``sum ceil(d0 / W) * (numel / d0)`` elements of every unit (``shard_numel``; tests/test_planner.py
  checks it against the real ``fully_shard`` on 2 gloo ranks).
- Sharded parameters: fp32 (``parallelize`` keeps the sharded parameters fp32 for every --precision), 4 B
  per element. Gradients: fp32 sharded, 4 B per trainable element, held from the backward that makes
  them to ``zero_grad`` after the step (all of them through the forward of later micro-batches when
  ``--accum_iter`` > 1). AdamW: ``exp_avg`` and ``exp_avg_sq`` fp32, 8 B per trainable element; the
  foreach step allocates one more fp32 copy of the largest parameter group (``sqrt(exp_avg_sq)``).
  Frozen parameters (``n_trainable`` < all: --trainable subsets, LoRA; counted by ``trainable_numel``) get no
  gradient and no optimizer state.
- Gathered parameters (compute dtype): ``fsdp`` all-gathers one unit at a time and frees it after its
  forward; the head is kept from its forward to its backward (``reshard_after_forward=False``); in
  backward the next unit is prefetched while one is computed: head + top layer during the head's
  backward, two layers during a layer's. ``sdp`` keeps every unit gathered from forward to backward.
  With more than one rank the head counts four times (its all-gather buffer next to the copied-out head,
  and up to two more head-sized communication buffers whose lifetime depends on rank timing, measured on
  2 gloo ranks by bench/bench_planner.py).
- Activations and the chunked loss: simulated, not guessed. The real decoder (transformers' layers, our
  dropout hooks, the activation-checkpoint wrapper of ``parallelize``) and the real
  ``_ChunkedHeadLoss`` run on FakeTensors (shapes only, no memory, no FLOPs) at the true B, S, hidden
  size and dtype, while a dispatch mode counts the bytes of every tensor storage alive (``_LiveBytes``).
  Two short models (1 and 2 decoder layers) give the per-layer increment; n layers hold
  ``E1 + (n - 1) * (E2 - E1)``. The forward peak (end of the head's chunk loop), the backward peak (head,
  final norm and top layer, each with its gathered units; it includes the layer's unsharded weight
  gradients, which FSDP builds in the layer's backward before reduce-scattering them) and what the loss holds
  (its fp32 [vocab, hidden] gradient accumulator, the hidden-state gradient, one [chunk, vocab] fp32
  buffer) all come out of the same simulation, with and without ``--checkpointing``.
- Peak = max(forward peak, backward peak, optimizer step) with the static terms that are alive then.
  That is what ``torch.cuda.max_memory_allocated`` reports. On a GPU add ``ALLOCATOR_SLACK`` (the caching
  allocator's reserved-but-unused blocks) and ``CUDA_CONTEXT_GB`` (CUDA context, NCCL buffers, not seen
  by the allocator) before comparing with ``--gpu_memory_gb``. bench/bench_planner.py measures the peak
  of tensor bytes on CPU (torch profiler allocation events) against this prediction.
- FLOPs: ``model.training.metrics.flops_per_token`` (6 x non-embedding parameters + 12 x layers x hidden x S per
  token, forward + backward) times the tokens of a step; activation checkpointing adds one forward of the
  decoder layers (hardware FLOPs, reported apart). Step time = FLOPs per rank / (GPU peak x MFU).

Only the parts that do not depend on the data are planned: items shorter than ``--max_seq_len`` use less.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import weakref
from unittest import mock
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

logger = logging.getLogger(__name__)

GiB = 2**30

# The published Chameleon configs (config.json of the Hugging Face releases facebook/chameleon-7b and
# facebook/chameleon-30b, written by transformers' convert_chameleon_weights_to_hf.py from Meta's
# params.json; the same values as Lumina-mGPT's starting points Alpha-VLLM/Chameleon_7B_mGPT and
# Chameleon_34B_mGPT, which Lumina calls 7B and 34B). Vocabulary 65536 with 8192 image codes at ids
# 4..8195; 7B: 4096 x 32 layers, 32 heads, MLP 11008; 34B ("30b" on the hub): 8192 x 48 layers, 64 heads,
# 8 key-value heads (GQA), MLP 22016 = 256 * ceil(8 * 8192 / 3 / 256), swin norm. Built by transformers,
# they have 7,013,666,816 and 34,294,308,864 parameters without the VQ model (tests/test_planner.py).
PRESETS = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=65536, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, swin_norm=False, model_parallel_size=1, bos_token_id=0,
               eos_token_id=2, pad_token_id=1),
    "34B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=65536, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096, swin_norm=True, model_parallel_size=4, bos_token_id=0,
                eos_token_id=2, pad_token_id=1),
}

# Dense peak TFLOP/s per GPU (NVIDIA datasheets: H100 SXM5 and H200 SXM: 989 bf16/fp16 tensor core,
# 494.5 tf32, 67 fp32; A100 SXM4 80GB: 312 bf16/fp16, 156 tf32, 19.5 fp32), and memory in GB.
GPUS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12, "memory_gb": 80},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12, "memory_gb": 141},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "memory_gb": 80},
}

# On a GPU, what the caching allocator reserves beyond the peak of allocated bytes (block rounding and
# fragmentation; 5-10% is typical for FSDP training, we take 10%) and what CUDA itself holds outside the
# allocator (context, cuBLAS workspaces, NCCL buffers: about 1-2 GB). Assumptions, not measured here:
# bench/gpu_check.sh prints the measured peak next to the prediction.
ALLOCATOR_SLACK = 0.10
CUDA_CONTEXT_GB = 1.5

COMPUTE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
COMPUTE_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PlanError(ValueError):
    """The flags cannot be planned (unknown model size, unreadable config); the message says which."""


# ------------------------------------------------------------------------------------------------------------
# the model and its FSDP units


def chameleon_vocabulary_map(vocab_size: int) -> dict[str, int]:
    """Chameleon's id layout for the names the model code looks at: 8192 image codes ``IMGIMG<letters>Z``
    at ids 4..8195 (digits written as letters A..J) and ``<image>`` at ``<reserved08707>`` (id 8711)."""
    vm = {"IMGIMG" + "".join(chr(65 + int(d)) for d in str(n)) + "Z": n + 4 for n in range(8192) if n + 4 < vocab_size}
    vm["<image>"] = min(8711, vocab_size - 1)
    return vm


def plan_config(init_from: str | None, model_size: str):
    """(ChameleonConfig, where it came from): ``--init_from``'s config.json when it is a local directory,
    else the published config of ``--model_size`` (what the trainer starts from when --init_from is unset)."""
    from transformers import ChameleonConfig

    from model.chameleon_lm import ModelLoadError, load_hf_config

    if init_from:
        p = Path(init_from).expanduser()
        if p.is_dir():
            try:
                return load_hf_config(p), f"{p / 'config.json'}"
            except ModelLoadError as e:
                raise PlanError(str(e)) from e
        if init_from.startswith((".", "/", "~")):
            raise PlanError(f"--init_from {init_from}: no such directory")
        logger.warning("--init_from %s is not a local directory: planning with the published %s config "
                       "(--model_size)", init_from, model_size)
    if model_size not in PRESETS:
        raise PlanError(f"--model_size {model_size}: no published config; choose one of {sorted(PRESETS)}")
    raw = PRESETS[model_size]
    cfg = ChameleonConfig(**raw, vocabulary_map=chameleon_vocabulary_map(raw["vocab_size"]))
    cfg._attn_implementation = "sdpa"
    return cfg, f"published Chameleon {model_size} config (model/training/planner.py PRESETS)"


@dataclass
class Unit:
    """One ``fully_shard`` unit of model/training/parallelize.py: its parameters' shapes (name -> shape)."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    reshard_after_forward: bool

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def shard_numel(self, world: int) -> int:
        """Elements one rank stores for this unit (dim 0 chunked into ceil(d0 / world) rows, padded)."""
        return sum(shard_rows(s[0], world) * math.prod(s[1:]) for s in self.shapes.values())


def shard_rows(d0: int, world: int) -> int:
    return -(-d0 // world)


def local_rows(d0: int, world: int, rank: int) -> int:
    """Rows of dim 0 that ``rank`` owns (torch.chunk semantics: the last ranks may own fewer or none)."""
    c = shard_rows(d0, world)
    return max(0, min(d0 - rank * c, c))


def fsdp_units(lm, data_parallel: str = "fsdp") -> list[Unit]:
    """The units of ``model.training.parallelize.parallelize`` in their order: embeddings, layers, head, root."""
    reshard = data_parallel == "fsdp"
    owned: set[str] = set()
    units = []

    def unit(name: str, module, rs: bool) -> None:
        shapes = {}
        for n, p in module.named_parameters(prefix=name):
            if n not in owned:
                shapes[n] = tuple(p.shape)
                owned.add(n)
        units.append(Unit(name, shapes, rs))

    unit("model.embed_tokens", lm.model.embed_tokens, reshard)
    for i, layer in enumerate(lm.model.layers):
        unit(f"model.layers.{i}", layer, reshard)
    unit("lm_head", lm.lm_head, False)
    unit("", lm, reshard)  # the root: what no other unit owns (the final norm)
    return units


# ------------------------------------------------------------------------------------------------------------
# activations and loss buffers, simulated on FakeTensors


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive (created under this mode) and their peak.

    Each storage is counted once, when an op first returns it, and released when torch frees it (a weak
    reference to the storage; torch keeps one Python object per live storage). Works on FakeTensors, so a
    34B layer at batch 8 x 4096 tokens is simulated without memory.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def ignore(self, tensors) -> None:
        """Storages not to count (the parameters: the plan accounts for them per FSDP unit)."""
        for t in tensors:
            self._seen[t.untyped_storage()] = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, n: int) -> None:
        self.live -= n

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = n
        weakref.finalize(st, self._release, n)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


@dataclass
class ActSim:
    """Simulated bytes for k decoder layers (one micro-batch)."""

    act_end: int       # alive after the decoder forward (saved activations + final hidden state)
    fwd_end: int       # alive after the head's forward (+ the loss's saved gradients)
    fwd_peak: int      # peak during the forward (inside the head's chunk loop)
    bwd_head_peak: int  # peak during the backward of the head (the loss)
    bwd_norm_peak: int  # peak during the backward of the final norm
    bwd_top_peak: int  # peak during the backward of the top layer (with checkpointing: its recompute too)


def simulate_micro_batch(config, *, n_layers: int, batch_size: int, seq_len: int, precision: str,
                         checkpointing: bool, dropout: float, z_loss_weight: float, mask_image_logits: bool,
                         loss_chunk_size: int) -> ActSim:
    """Runs the real decoder and chunked loss of ``n_layers`` layers on FakeTensors and counts bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    from model.chameleon_lm import _ChunkedHeadLoss, build_chameleon_lm

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = n_layers
    cfg.max_position_embeddings = max(seq_len, int(getattr(cfg, "max_position_embeddings", 0) or 0))
    dtype = COMPUTE_DTYPE[precision]
    lm = build_chameleon_lm(cfg, device="meta", mask_image_logits=mask_image_logits, z_loss_weight=z_loss_weight,
                            dropout=dropout, loss_chunk_size=loss_chunk_size).to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        lm.to_empty(device="cpu")
        lm.reset_nonpersistent_buffers("cpu")
        # every parameter is trained, so every matmul saves its input; a layer's weight gradients are the
        # unsharded gradients FSDP builds in that layer's backward (then reduce-scatters and frees)
        layers = lm.model.layers
        if checkpointing:  # exactly as model/training/parallelize.py wraps them
            for i, layer in enumerate(layers):
                layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        lm.train()
        marks = {}
        tracker = _LiveBytes()
        tracker.ignore(list(lm.parameters()) + list(lm.buffers()))

        def before_final_norm(_module, _grad):
            marks["head"] = tracker.peak
            tracker.reset_peak()

        def before_top_layer(_module, _grad):
            marks["norm"] = tracker.peak
            tracker.reset_peak()

        def before_next_layer(_module, _grad):
            marks.setdefault("top", tracker.peak)

        lm.model.norm.register_full_backward_pre_hook(before_final_norm)
        layers[-1].register_full_backward_pre_hook(before_top_layer)
        if n_layers >= 2:
            layers[-2].register_full_backward_pre_hook(before_next_layer)
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        n_rows = batch_size * (seq_len - 1)  # every target labelled: the worst case
        # transformers decides from the position ids' values whether rows are packed; FakeTensors have no
        # values, so it would build a [B, 1, S, S] mask that the trainer's unpacked batches never get
        with mock.patch("transformers.masking_utils.find_packed_sequence_indices", return_value=None), tracker:
            hidden = lm.model(input_ids=ids, use_cache=False).last_hidden_state
            act_end = tracker.live
            # what LMHeadWithLoss.forward does when every position has a target
            h = hidden.reshape(-1, cfg.hidden_size).index_select(0, torch.arange(n_rows)).to(lm.lm_head.weight.dtype)
            targets = torch.zeros(n_rows, dtype=torch.long)
            text_rows = image_cols = None
            if mask_image_logits and lm.lm_head._image_ids.numel():
                text_rows = torch.ones(n_rows, dtype=torch.bool)
                image_cols = lm.lm_head._image_range or lm.lm_head._image_ids
            total, _ce, _z = _ChunkedHeadLoss.apply(h, lm.lm_head.weight, targets, text_rows, image_cols,
                                                    float(z_loss_weight), int(loss_chunk_size))
            del hidden, h, targets, text_rows
            fwd_peak, fwd_end = tracker.peak, tracker.live
            tracker.reset_peak()
            total.backward()
    return ActSim(act_end=act_end, fwd_end=fwd_end, fwd_peak=fwd_peak, bwd_head_peak=marks["head"],
                  bwd_norm_peak=marks["norm"], bwd_top_peak=marks.get("top", tracker.peak))


@dataclass
class Activations:
    """Bytes of one micro-batch for the whole decoder (n layers), from two simulations (1 and 2 layers)."""

    per_layer: int       # saved per decoder layer (with checkpointing: its input)
    decoder: int         # alive after the decoder's forward (all layers + final hidden state)
    loss: int            # what the chunked loss keeps from forward to backward (fp32 head grad, dL/dh)
    fwd_peak: int        # peak of the forward (decoder + the head's chunk loop)
    bwd_head_peak: int   # peak of the backward of the head (the loss)
    bwd_norm_peak: int   # peak of the backward of the final norm
    bwd_top_peak: int    # peak of the backward of the top layer

    @property
    def bwd_peak(self) -> int:
        return max(self.bwd_head_peak, self.bwd_norm_peak, self.bwd_top_peak)

    def scaled(self, other: "Activations", k: float) -> "Activations":
        """self + k * (other - self), field by field (extrapolation in the batch size)."""
        return Activations(**{f.name: int(round(getattr(self, f.name) + k * (getattr(other, f.name)
                                                                                - getattr(self, f.name))))
                              for f in dataclasses.fields(self)})

    @classmethod
    def simulate(cls, config, **kw) -> "Activations":
        n = config.num_hidden_layers
        one = simulate_micro_batch(config, n_layers=1, **kw)
        if n == 1:
            return cls(one.act_end, one.act_end, one.fwd_end - one.act_end, one.fwd_peak, one.bwd_head_peak,
                       one.bwd_norm_peak, one.bwd_top_peak)
        two = simulate_micro_batch(config, n_layers=2, **kw)
        d = two.act_end - one.act_end
        return cls(per_layer=d, decoder=one.act_end + (n - 1) * d, loss=two.fwd_end - two.act_end,
                   fwd_peak=one.fwd_peak + (n - 1) * d, bwd_head_peak=one.bwd_head_peak + (n - 1) * d,
                   bwd_norm_peak=one.bwd_norm_peak + (n - 1) * d,
                   bwd_top_peak=two.bwd_top_peak + (n - 2) * d)


class ActivationModel:
    """Activations for any --batch_size at fixed other settings: every simulated byte count is affine in the
    batch size (activations grow with batch x seq_len, the loss's [vocab, hidden] and [chunk, vocab] buffers
    do not once a micro-batch has a chunk of rows), so batch sizes 1 and 2 are simulated and the rest
    extrapolated; when one row holds fewer targets than a chunk, each batch size is simulated."""

    def __init__(self, config, **kw):
        self.config, self.kw = config, kw
        self._sims: dict[int, Activations] = {}

    def _sim(self, batch_size: int) -> Activations:
        if batch_size not in self._sims:
            self._sims[batch_size] = Activations.simulate(self.config, batch_size=batch_size, **self.kw)
        return self._sims[batch_size]

    def at(self, batch_size: int) -> Activations:
        if batch_size <= 2 or self.kw["seq_len"] - 1 < self.kw["loss_chunk_size"]:
            return self._sim(batch_size)
        return self._sim(1).scaled(self._sim(2), batch_size - 1)


# ------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Settings:
    """The flags a plan depends on (TrainArgs names)."""

    batch_size: int = 4
    accum_iter: int = 4
    max_seq_len: int = 4096
    precision: str = "bf16"
    grad_precision: str = "fp32"
    data_parallel: str = "fsdp"
    checkpointing: bool = False
    compile: bool = False  # --compile: no memory or FLOP change is planned (see COMPILE_NOTE)
    dropout: float = 0.0
    z_loss_weight: float = 0.0
    mask_image_logits: bool = True
    loss_chunk_size: int = 1024
    world_size: int = 1

    @classmethod
    def from_args(cls, a, world_size: int) -> "Settings":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "world_size"]
        return cls(**{n: getattr(a, n) for n in names}, world_size=world_size)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum_iter * self.world_size


@dataclass
class Model:
    """What the plan needs from the meta-device model."""

    config: object
    source: str
    n_params: int
    n_params_no_embed: int
    units_fsdp: list[Unit]
    units_sdp: list[Unit]
    decay_numel: int      # parameters of the weight-decay group (the larger AdamW foreach group)

    @classmethod
    def build(cls, init_from: str | None, model_size: str) -> "Model":
        return cls.from_config(*plan_config(init_from, model_size))

    @classmethod
    def from_config(cls, config, source: str = "config") -> "Model":
        from model.chameleon_lm import build_chameleon_lm
        from model.training.optim import no_decay

        lm = build_chameleon_lm(config, device="meta")
        n = sum(p.numel() for p in lm.parameters())
        decay = sum(p.numel() for name, p in lm.named_parameters() if not no_decay(name, p))
        return cls(config, source, n, n - lm.model.embed_tokens.weight.numel(), fsdp_units(lm, "fsdp"),
                   fsdp_units(lm, "sdp"), decay)

    def units(self, data_parallel: str) -> list[Unit]:
        return self.units_fsdp if data_parallel == "fsdp" else self.units_sdp


def trainable_numel(config, a) -> int | None:
    """Parameters that get gradients and AdamW state under the run's --trainable / --lora_* flags (None: all).
    Whole tensors count: a row-level preset (image_head) keeps its tensors' full gradients (model/training/trainable.py)."""
    if getattr(a, "trainable", None) in (None, "all") and not getattr(a, "lora_rank", 0):
        return None
    from model.chameleon_lm import build_chameleon_lm
    from model.training.lora import apply_lora
    from model.training.trainable import apply_trainable

    lm = build_chameleon_lm(config, device="meta")
    apply_lora(lm, a)
    apply_trainable(lm, a.trainable, lora=a.lora_rank > 0)
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def plan_memory(m: Model, s: Settings, *, n_trainable: int | None = None, on_gpu: bool = True,
                _act_cache: dict | None = None) -> dict:
    """Per-rank bytes of a run; ``n_trainable`` (default: all) are the parameters with gradients and AdamW
    state (frozen ones, e.g. under LoRA, have neither). Returns the breakdown at the peak and the phases."""
    w = s.world_size
    b = COMPUTE_BYTES[s.precision]
    units = m.units(s.data_parallel)
    shard = sum(u.shard_numel(w) for u in units)
    frac = 1.0 if n_trainable is None else n_trainable / m.n_params
    params_b = 4 * shard
    grads_b = int(4 * shard * frac)
    optim_b = int(8 * shard * frac)
    step_tmp_b = int(4 * -(-m.decay_numel // w) * frac)  # foreach sqrt(exp_avg_sq) of the decay group
    layer_units = [u for u in units if u.name.startswith("model.layers.")]
    head = next(u for u in units if u.name == "lm_head")
    layer_numel = max((u.numel for u in layer_units), default=0)
    head_numel = head.numel
    layer_shard = max((u.shard_numel(w) for u in layer_units), default=0)

    key = (s.max_seq_len, s.precision, s.checkpointing, s.dropout > 0, s.z_loss_weight, s.mask_image_logits,
           s.loss_chunk_size)
    cache = _act_cache if _act_cache is not None else {}
    if key not in cache:
        cache[key] = ActivationModel(
            m.config, seq_len=s.max_seq_len, precision=s.precision, checkpointing=s.checkpointing,
            dropout=s.dropout, z_loss_weight=s.z_loss_weight, mask_image_logits=s.mask_image_logits,
            loss_chunk_size=s.loss_chunk_size)
    act = cache[key].at(s.batch_size)
    inputs_b = 2 * 8 * s.batch_size * s.max_seq_len * s.accum_iter  # input_ids + labels (int64) of a step
    grads_carry = grads_b if s.accum_iter > 1 else 0  # earlier micro-batches' gradients
    # with more than one rank, the head's all-gather buffer stays alive next to the unsharded head that FSDP2
    # copies out of it, through the head's forward and backward; and how long communication buffers live
    # depends on when the other ranks arrive: on 2 gloo ranks the peak varied between runs by up to two
    # more head-sized buffers (bench/bench_planner.py). The plan counts them: a worst case, 4 heads in all.
    head_gathered = b * head_numel * (4 if w > 1 else 1)
    if s.data_parallel == "fsdp":
        gathered_fwd = head_gathered
        # backward: the head's (its backward comes first) with the top layer prefetched, then one layer
        # computed while the next is prefetched; each backward sub-phase with its own simulated peak
        bwd = max((act.bwd_head_peak + head_gathered + b * layer_numel, head_gathered + b * layer_numel),
                  (act.bwd_norm_peak + b * layer_numel, b * layer_numel),
                  (act.bwd_top_peak + b * 2 * layer_numel, b * 2 * layer_numel))
        bwd_act, gathered_bwd = bwd[0] - bwd[1], bwd[1]
    else:  # sdp: everything stays gathered from forward to backward
        gathered_fwd = gathered_bwd = b * sum(u.numel for u in units) + head_gathered - b * head_numel
        bwd_act = act.bwd_peak
    grads_so_far = int(4 * (head.shard_numel(w) + layer_shard) * frac)
    phases = {
        "forward": params_b + optim_b + grads_carry + gathered_fwd + act.fwd_peak + inputs_b,
        "backward": params_b + optim_b + max(grads_carry, grads_so_far) + gathered_bwd + bwd_act + inputs_b,
        "optimizer_step": params_b + optim_b + grads_b + step_tmp_b,
    }
    peak_phase = max(phases, key=phases.get)
    allocated = phases[peak_phase]
    slack = int(ALLOCATOR_SLACK * allocated) if on_gpu else 0
    context = int(CUDA_CONTEXT_GB * GiB) if on_gpu else 0
    at_peak = {
        "sharded_params": params_b,
        "optimizer_states": optim_b,
        "grads": grads_b if peak_phase == "optimizer_step" else (
            grads_carry if peak_phase == "forward" else max(grads_carry, grads_so_far)),
        "gathered_params": {"forward": gathered_fwd, "backward": gathered_bwd}.get(peak_phase, 0),
        "activations_and_loss": {"forward": act.fwd_peak, "backward": bwd_act}.get(peak_phase, 0),
        "inputs": inputs_b if peak_phase != "optimizer_step" else 0,
        "optimizer_step_temp": step_tmp_b if peak_phase == "optimizer_step" else 0,
        "allocator_slack": slack,
        "cuda_context": context,
    }
    return {"per_rank_bytes": allocated + slack + context, "allocated_peak_bytes": allocated,
            "peak_phase": peak_phase, "phases": phases, "breakdown": at_peak,
            "components": {"sharded_params": params_b, "grads": grads_b, "optimizer_states": optim_b,
                           "optimizer_step_temp": step_tmp_b, "gathered_params_forward": gathered_fwd,
                           "gathered_params_backward": gathered_bwd,
                           "activations_per_layer": act.per_layer, "activations_decoder": act.decoder,
                           "loss_buffers": act.loss, "activations_forward_peak": act.fwd_peak,
                           "activations_backward_peak": act.bwd_peak, "inputs": inputs_b}}


def plan_compute(m: Model, s: Settings, *, gpu: str, mfu: float) -> dict:
    """FLOPs of one optimizer step and, at ``mfu`` of ``gpu``'s peak for the compute dtype, its time."""
    from model.training.metrics import flops_per_token

    cfg = m.config
    tokens_rank = s.batch_size * s.accum_iter * s.max_seq_len
    per_token = flops_per_token(m.n_params_no_embed, cfg.num_hidden_layers, cfg.hidden_size, s.max_seq_len)
    model_flops_rank = per_token * tokens_rank
    # recomputing each layer's forward in backward: 1/3 of the layers' share again (hardware FLOPs)
    head_share = 6.0 * cfg.vocab_size * cfg.hidden_size
    layer_share = per_token - head_share
    hw_flops_rank = model_flops_rank + (layer_share / 3.0 * tokens_rank if s.checkpointing else 0.0)
    peak = GPUS[gpu][s.precision]
    step_time = model_flops_rank / (peak * mfu)
    return {"gpu": gpu, "peak_flops": peak, "mfu": mfu, "flops_per_token": per_token,
            "model_flops_per_step": model_flops_rank * s.world_size,
            "hardware_flops_per_step": hw_flops_rank * s.world_size,
            "step_time_s": step_time, "tokens_per_step": tokens_rank * s.world_size,
            "tokens_per_s": tokens_rank * s.world_size / step_time, "tokens_per_s_per_gpu": tokens_rank / step_time,
            "hardware_mfu_needed": mfu * hw_flops_rank / model_flops_rank}


def _fits(mem: dict, limit: int) -> bool:
    return mem["per_rank_bytes"] <= limit


def suggestions(m: Model, s: Settings, limit: int, *, n_trainable=None, on_gpu=True, cache=None) -> list[dict]:
    """The nearest settings that fit: checkpointing on; the largest --batch_size that keeps the global batch
    (``--accum_iter`` raised to match) with the current and with checkpointing; the fewest GPUs."""
    out = []

    def fits(t: Settings) -> bool:
        return _fits(plan_memory(m, t, n_trainable=n_trainable, on_gpu=on_gpu, _act_cache=cache), limit)

    if not s.checkpointing:
        t = dataclasses.replace(s, checkpointing=True)
        if fits(t):
            out.append({"change": "--checkpointing", "settings": _flags(t)})
    per_rank_items = s.batch_size * s.accum_iter
    for ck in sorted({s.checkpointing, True}):
        for bs in range(s.batch_size - 1, 0, -1):
            if per_rank_items % bs:
                continue
            t = dataclasses.replace(s, batch_size=bs, accum_iter=per_rank_items // bs, checkpointing=ck)
            if fits(t):
                out.append({"change": f"--batch_size {bs} --accum_iter {per_rank_items // bs}"
                                      + (" --checkpointing" if ck and not s.checkpointing else "")
                                      + " (same global batch)", "settings": _flags(t)})
                break
    step = 8 if s.world_size % 8 == 0 else 1
    for w in range(s.world_size + step, max(4096, s.world_size * 64) + 1, step):
        t = dataclasses.replace(s, world_size=w)
        if fits(t):
            out.append({"change": f"{w} GPUs (global batch {t.global_batch})", "settings": _flags(t)})
            break
    return out


def _flags(s: Settings) -> dict:
    return {"batch_size": s.batch_size, "accum_iter": s.accum_iter, "checkpointing": s.checkpointing,
            "world_size": s.world_size, "global_batch": s.global_batch}


def max_batch_size(m: Model, s: Settings, limit: int, *, cap: int = 64, n_trainable=None, on_gpu=True,
                   cache=None) -> int:
    """Largest --batch_size that fits with the other settings unchanged (0: not even 1)."""
    best = 0
    for bs in range(1, cap + 1):
        if not _fits(plan_memory(m, dataclasses.replace(s, batch_size=bs), n_trainable=n_trainable, on_gpu=on_gpu,
                                 _act_cache=cache), limit):
            break
        best = bs
    return best


def min_world_size(m: Model, s: Settings, limit: int, *, step: int = 8, cap: int = 4096, n_trainable=None,
                   on_gpu=True, cache=None) -> int:
    """Fewest GPUs (a multiple of ``step``, or 1..7 below 8) on which the per-GPU settings fit (0: none <= cap)."""
    sizes = [w for w in (1, 2, 4) if w < step] + list(range(step, cap + 1, step))
    for w in sizes:
        if _fits(plan_memory(m, dataclasses.replace(s, world_size=w), n_trainable=n_trainable, on_gpu=on_gpu,
                             _act_cache=cache), limit):
            return w
    return 0


COMPILE_NOTE = ("--compile (each decoder layer compiled): planned memory and FLOPs are those without it. Inductor "
                "fuses elementwise ops and may keep fewer intermediates, but no GPU measurement of that exists "
                "here, so nothing is subtracted; the speed-up enters only through --mfu (torchtitan reports +16% "
                "tokens/s for Llama 3.1 8B on 8 H100; bench/gpu_check measures ours). The first step also compiles "
                "(minutes on a big model; Inductor's cache serves later runs).")


def make_plan(a, *, world_size: int, gpu_memory_gb: float, gpu: str, mfu: float,
              n_trainable: int | None = None) -> dict:
    """The whole plan as one JSON-able dict (the object ``--plan --json`` prints; keys in the README)."""
    m = Model.build(a.init_from, a.model_size)
    s = Settings.from_args(a, world_size)
    if n_trainable is None:
        n_trainable = trainable_numel(m.config, a)
    limit = int(gpu_memory_gb * 1e9)
    cache: dict = {}
    mem = plan_memory(m, s, n_trainable=n_trainable, _act_cache=cache)
    other = plan_memory(m, dataclasses.replace(s, checkpointing=not s.checkpointing), n_trainable=n_trainable,
                        _act_cache=cache)
    w = s.world_size
    units = m.units(s.data_parallel)
    plan = {
        "model": {"source": m.source, "hidden_size": m.config.hidden_size, "layers": m.config.num_hidden_layers,
                  "vocab_size": m.config.vocab_size, "heads": m.config.num_attention_heads,
                  "kv_heads": m.config.num_key_value_heads},
        "n_params": m.n_params,
        "n_params_no_embed": m.n_params_no_embed,
        "n_trainable": m.n_params if n_trainable is None else n_trainable,
        "params_per_rank": sum(u.shard_numel(w) for u in units),
        "settings": {**dataclasses.asdict(s), "global_batch": s.global_batch},
        "gpu_memory_bytes": limit,
        "per_rank_bytes": mem["per_rank_bytes"],
        "allocated_peak_bytes": mem["allocated_peak_bytes"],
        "peak_phase": mem["peak_phase"],
        "fits": _fits(mem, limit),
        "breakdown": mem["breakdown"],
        "phases": mem["phases"],
        "components": mem["components"],
        "activations": {"checkpointing" if s.checkpointing else "no_checkpointing": mem["components"]["activations_decoder"],
                        "no_checkpointing" if s.checkpointing else "checkpointing": other["components"]["activations_decoder"]},
        "per_rank_bytes_other_checkpointing": other["per_rank_bytes"],
        "compute": plan_compute(m, s, gpu=gpu, mfu=mfu),
        "suggestions": [],
        "compile": {"on": s.compile, "memory_change_bytes": 0, "flops_change": 0,
                    "note": COMPILE_NOTE if s.compile else "--compile off"},
        "assumptions": {"allocator_slack": ALLOCATOR_SLACK, "cuda_context_gb": CUDA_CONTEXT_GB,
                        "sequence": "every item max_seq_len tokens, every position labelled"},
    }
    if not plan["fits"]:
        plan["suggestions"] = suggestions(m, s, limit, n_trainable=n_trainable, cache=cache)
    return plan


def format_plan(p: dict) -> str:
    """The plan as a human-readable table."""
    def gb(x):
        return f"{x / 1e9:8.2f} GB"

    s, c, bd = p["settings"], p["compute"], p["breakdown"]
    lines = [
        f"model: {p['model']['source']}",
        f"  {p['n_params'] / 1e9:.3f}B parameters ({p['n_params']:,}; {p['n_params_no_embed']:,} without embeddings), "
        f"{p['n_trainable']:,} trainable; hidden {p['model']['hidden_size']}, {p['model']['layers']} layers, "
        f"vocab {p['model']['vocab_size']}",
        f"run: {s['world_size']} ranks x batch_size {s['batch_size']} x accum_iter {s['accum_iter']} = global batch "
        f"{s['global_batch']}; max_seq_len {s['max_seq_len']}; --precision {s['precision']}; --data_parallel "
        f"{s['data_parallel']}; checkpointing {'on' if s['checkpointing'] else 'off'}; compiled layers "
        f"{'on' if s.get('compile') else 'off'}",
        f"per rank: {p['params_per_rank']:,} parameters ({p['params_per_rank'] / max(p['n_params'], 1):.4f} of all)",
        "",
        f"memory per rank at the peak ({p['peak_phase']}):",
    ]
    labels = {"sharded_params": "sharded parameters (fp32)", "optimizer_states": "AdamW states (fp32 x 2)",
              "grads": "gradients (fp32, sharded)", "gathered_params": "gathered layers (compute dtype, prefetch)",
              "activations_and_loss": "activations + loss (+ layer grads in bwd)",
              "inputs": "input ids + labels", "optimizer_step_temp": "optimizer step temporaries",
              "allocator_slack": f"allocator slack ({ALLOCATOR_SLACK:.0%})", "cuda_context": "CUDA context + NCCL"}
    for k, v in bd.items():
        lines.append(f"  {labels[k]:<44}{gb(v)}")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<44}{gb(p['per_rank_bytes'])}   vs {p['gpu_memory_bytes'] / 1e9:.0f} GB: {verdict}")
    comp = p["components"]
    lines += [
        "phases (allocated, without slack): " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in p["phases"].items()),
        f"activations of one micro-batch: {comp['activations_per_layer'] / 1e9:.3f} GB per layer; decoder: "
        + ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f} GB" for k, v in p["activations"].items())
        + f"; chunked loss keeps {comp['loss_buffers'] / 1e9:.2f} GB",
        f"with checkpointing {'off' if s['checkpointing'] else 'on'} the total would be "
        f"{p['per_rank_bytes_other_checkpointing'] / 1e9:.2f} GB",
        "",
        f"compute: {c['model_flops_per_step']:.3e} model FLOPs per step ({c['flops_per_token']:.3e} per token); at MFU "
        f"{c['mfu']:.2f} of {c['gpu']} ({c['peak_flops'] / 1e12:.0f} TFLOP/s {s['precision']}): step {c['step_time_s']:.2f} s, "
        f"{c['tokens_per_s']:,.0f} tokens/s ({c['tokens_per_s_per_gpu']:,.0f} per GPU)",
    ]
    if s["checkpointing"]:
        lines.append(f"  (checkpointing recomputes the layers' forward: the GPU runs at MFU "
                     f"{c['hardware_mfu_needed']:.2f} in hardware FLOPs for that)")
    if s.get("compile"):
        lines += ["", COMPILE_NOTE]
    if p["suggestions"]:
        lines += ["", "nearest settings that fit:"] + [f"  {x['change']}" for x in p["suggestions"]]
    elif not p["fits"]:
        lines += ["", "no nearby setting fits (try a smaller --max_seq_len)"]
    return "\n".join(lines)


def world_size_from_env() -> int:
    """World size the launch environment announces (torchrun WORLD_SIZE, SLURM_NTASKS), else 1."""
    import os

    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def run_plan(a, n_trainable: int | None = None) -> int:
    """``finetune_solver.py --plan``: prints the plan (``--json``: one JSON object) and returns the exit code."""
    world = a.world_size or world_size_from_env()
    try:
        p = make_plan(a, world_size=world, gpu_memory_gb=a.gpu_memory_gb, gpu=a.gpu, mfu=a.mfu,
                      n_trainable=n_trainable)
    except PlanError as e:
        print(f"cannot plan: {e}", flush=True)
        return 2
    print(json.dumps(p) if a.json else format_plan(p), flush=True)
    return 0

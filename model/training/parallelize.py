"""FSDP2 sharding, mixed precision and activation checkpointing for a ``ChameleonLM``, in one function.

Units, as in Lumina's ``get_fsdp_wrap_module_list``: each decoder layer, the embeddings, the head, and the
root (what is left: the final norm). ``--data_parallel fsdp`` = full shard (parameters re-sharded after
forward and gathered again for backward, ZeRO-3); ``sdp`` = shard gradients and optimizer state but keep
the gathered parameters from forward to backward (``reshard_after_forward=False``, Lumina's
SHARD_GRAD_OP, ZeRO-2). The head is never re-sharded after forward: backward starts with it.

Mixed precision: parameters and optimizer state stay fp32 (sharded); ``--precision bf16`` gathers them as
bf16 for compute, ``--grad_precision`` is the dtype gradients are reduced in. On CPU use fp32.

Compile (``--compile``): each decoder layer's forward is ``torch.compile``d, as torchtitan applies it: per
block, after activation checkpointing (the checkpointed region is traced as one) and before ``fully_shard``,
so FSDP's all-gather / reshard hooks stay outside the compiled code, run eagerly around it. The layer's
``forward`` is replaced in place instead of wrapping the layer in an ``OptimizedModule``, so parameter and
state-dict names (checkpoints, exports, --trainable, LoRA) do not change. All layers share one compiled
graph (the same code; their parameters are graph inputs). ``dynamic=True``: sequence lengths differ from
batch to batch (padding to the longest item, --packing), and one symbolic graph serves them all; it is also
what makes resume exact, since a resumed run runs the same kernels as a run never stopped (with automatic
dynamic shapes the first shape after a restart would get a static graph of its own, rounded differently).

Gradients are averaged over ranks (FSDP's default; ReduceOp.PREMUL_SUM, which a custom divide factor
needs, does not exist in gloo). The trainer therefore scales each rank's loss by
world_size / (labelled tokens in the global batch): the averaged gradient is the gradient of the global
token-mean loss, whatever the world size and however the tokens fall on ranks and micro-batches.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model.chameleon_lm import ChameleonLM

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parallelize(lm: ChameleonLM, mesh: DeviceMesh, *, data_parallel: str = "fsdp", precision: str = "bf16",
                grad_precision: str = "fp32", checkpointing: bool = False, compile: bool = False) -> ChameleonLM:
    """Wraps ``lm`` in place (activation checkpointing, compile, then ``fully_shard`` per unit) and returns it."""
    if data_parallel not in ("fsdp", "sdp"):
        raise ValueError(f"--data_parallel {data_parallel!r}: choose fsdp or sdp")
    reshard = data_parallel == "fsdp"
    param_dtype = DTYPES[precision]
    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=DTYPES[grad_precision])
    layers = lm.model.layers
    if checkpointing:
        # non-reentrant torch.utils.checkpoint per layer; it restores the RNG state on recompute, so the
        # dropout masks of the replay equal those of the forward
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if compile:
        compile_layers(layers)
    fully_shard(lm.model.embed_tokens, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(lm.lm_head, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    fully_shard(lm, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    logger.info("FSDP2 over %d ranks: %s, param dtype %s, reduce dtype %s, activation checkpointing %s, "
                "compiled layers %s", mesh.size(), "full shard" if reshard else "grad-op shard (no reshard after "
                "forward)", param_dtype, DTYPES[grad_precision], "on" if checkpointing else "off",
                "on" if compile else "off")
    return lm


def compile_layers(layers: torch.nn.ModuleList) -> None:
    """``torch.compile`` each layer's forward in place (names unchanged; see the module docstring). The first
    step compiles (its time shows in that step's ``time``); Inductor's on-disk cache serves later runs."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)


def set_gradient_sync(lm: ChameleonLM, enabled: bool) -> None:
    """With ``sdp``, gradients of all but the last micro-batch are accumulated unsharded and reduced once
    (Lumina's ``no_sync``); with ``fsdp`` every micro-batch is reduce-scattered."""
    if isinstance(lm, FSDPModule):
        lm.set_requires_gradient_sync(enabled)

"""Parallelism applied to the decoder from outside (torchtitan style): FSDP2 `fully_shard` per
block and activation checkpointing per block. The model file never changes for a strategy."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from tinyrecipe.model import Llama


def apply_activation_checkpointing(model: Llama) -> None:
    """Recompute each block's activations in backward. Parameter names stay unchanged."""
    for block in model.blocks:
        if getattr(block, "_checkpointed", False):
            continue
        plain_forward = block.forward
        block.forward = functools.partial(checkpoint, plain_forward, use_reentrant=False)
        block._checkpointed = True


def compile_blocks(model: Llama) -> None:
    """`torch.compile` each decoder block in place (state-dict names unchanged). All blocks share
    one compiled graph, so compile time is one block's, not the model's (torchtitan's choice)."""
    for block in model.blocks:
        block.compile()


def apply_fsdp2(model: Llama, mesh, reshard_after_forward: bool = True, mp_policy=None) -> None:
    """Shard each decoder block, then the root (embedding, final norm, head), over `mesh`."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def bf16_mixed_policy():
    """FSDP2 mixed precision: bf16 compute and gradient reduction, fp32 master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

"""Parallelism and speed applied to the decoder from outside (torchtitan's way): LoRA adapters,
float8 linear layers, activation checkpointing, per-block `torch.compile` and FSDP2
`fully_shard`, each per decoder block. The model file never changes for a strategy, and
parameter names stay the same under all of them.

`parallelize` applies them in the one order that composes: LoRA or float8 swaps the blocks'
linear layers first (the others then wrap, trace and shard the swapped modules); checkpointing makes each
block a `CheckpointedBlock` next, so compile traces the checkpointed forward (one graph that
recomputes in backward); compile comes before sharding, so FSDP2's all-gather and reduce-scatter hooks run
eagerly around each compiled block instead of breaking the graph; the model is materialised
last, already sharded, so a model built on the meta device never exists whole in memory.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from importlib.metadata import version

import torch
from torch.utils.checkpoint import checkpoint

from tinyrecipe.model.attention import (
    gpu_capability,
    load_fa3,
    load_flash_attn,
    load_torch_varlen,
)
from tinyrecipe.model.llama import Block, Llama
from tinyrecipe.model.lora import LORA_ALPHA, LORA_TARGETS, apply_lora, check_lora


def check_float8(device: torch.device | str | None) -> None:
    """One line where float8 matmuls cannot run: a CUDA GPU before compute capability 8.9. A CPU
    runs them (slowly: the tests' reference), and so do H100/H200/L40S/RTX 4090-class GPUs."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(
            f"model.speed.float8 needs float8 matmuls (compute capability 8.9+: H100, H200, L40S, ...); "
            f"{torch.cuda.get_device_name(device)} has {'.'.join(map(str, capability))}: set "
            "model.speed.float8: false"
        )


def apply_float8(model: Llama) -> None:
    """Swap the decoder blocks' linear layers (qkv, attention and MLP projections) for torchao's
    `Float8Linear`: matmul inputs cast to float8 (e4m3, one dynamic scale per tensor) in forward
    and backward, master weights and gradients unchanged, parameter names unchanged. The
    embedding and the head stay in the compute dtype (torchtitan's choice too: the head's
    logits are the most sensitive to precision), as do layers whose sizes are not multiples of
    16 (float8 matmuls need them)."""
    try:
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as err:
        if importlib.util.find_spec("torchao") is None:
            raise ImportError(
                "model.speed.float8 needs torchao: pip install 'tinyrecipe[gpu]' (or pip install torchao)"
            ) from None
        raise ImportError(  # each torchao release is made for one or two torch releases
            f"model.speed.float8: torchao {version('torchao')} does not import with torch "
            f"{torch.__version__} ({err}); install the torchao release made for this torch "
            "(torchao's compatibility table; e.g. torchao 0.17 runs on torch 2.9 to 2.13)"
        ) from None

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        return (
            fqn.startswith("blocks.")
            and not isinstance(module, Float8Linear)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, module_filter_fn=wanted)


class CheckpointedBlock(Block):
    """A decoder block that recomputes its activations in backward. Its forward calls
    `checkpoint` itself, so `torch.compile` of the block traces the checkpoint as one
    higher-order op (forward and recompute in one graph) instead of stopping at
    `checkpoint`'s dynamo-disabled frame and running the block eagerly."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: Llama) -> None:
    """Recompute each block's activations in backward: each block becomes a `CheckpointedBlock`
    (its class swapped in place, so parameter names and state-dict keys stay unchanged)."""
    for block in model.blocks:
        if not isinstance(block, CheckpointedBlock):
            block.__class__ = CheckpointedBlock


def compile_blocks(model: Llama) -> None:
    """`torch.compile` each decoder block in place (state-dict names unchanged), whole-graph:
    a graph break is an error, never a block that silently runs eager. All blocks share one
    compiled graph, so compile time is one block's, not the model's (torchtitan's choice).
    The chunked loss's bf16/fp16 softmax work is compiled too (`tinyrecipe.model.loss`)."""
    load_flash_attn()  # settle the kernel choices outside the graph
    load_fa3()
    load_torch_varlen()
    if torch.cuda.is_available():
        gpu_capability(torch.device("cuda"))
    for block in model.blocks:
        block.compile(fullgraph=True)
    model.compile_loss = True


def bf16_mixed_policy():
    """FSDP2 mixed precision: bf16 parameters and compute, fp32 gradient reduction and master
    weights (the sharded parameters and AdamW states stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp2(model: Llama, mesh, reshard_after_forward: bool = True, mp_policy=None) -> None:
    """Shard each decoder block, then the root (embedding, final norm, head), over `mesh`.

    `reshard_after_forward=True` (ZeRO-3) frees each block's gathered weights after its forward and
    gathers them again in backward: the least memory (TinyLlama-1.1B over 8 GPUs: 0.55 GB of
    bf16 weights per GPU plus two gathered blocks) for one more all-gather per block and
    micro-batch. False keeps them gathered from forward to backward (ZeRO-2: +2.2 GB per GPU at
    1.1B, one all-gather fewer per block)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


@contextmanager
def keep_gathered(model: torch.nn.Module, enabled: bool = True):
    """While enabled (a micro-batch that is not the last of its optimizer step), every FSDP2
    module keeps its gathered weights after backward instead of resharding them, so the next
    micro-batch's forward gathers nothing (FSDP2's `set_reshard_after_backward(False)`). With
    `reshard_after_forward=False` too, the weights are gathered once per optimizer step, not
    twice per micro-batch: the step's last micro-batch reshards as usual, before the optimizer
    updates the shards. The price: each rank holds the whole model's gathered compute-dtype
    weights through the step (2.2 GB in bf16 at 1.1B)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for module in modules:
        module.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_reshard_after_backward(True, recurse=False)


def reshard(model: torch.nn.Module) -> None:
    """Free every FSDP2 module's gathered weights (a no-op for a module already sharded). A
    forward without backward leaves them gathered where `reshard_after_forward` is False (always
    for the root); Fabric's checkpointing looks for sharded parameters."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def hsdp_mesh(device_type: str, world: int, shard_group_size: int | None):
    """The 2-D (replicate, shard) mesh of HSDP: shard within groups of `shard_group_size`
    ranks (a node), replicate across them. None when the group is every rank (plain FSDP)."""
    group = shard_group_size
    if group is None or group == world:
        return None
    if group < 1 or world % group:
        raise ValueError(
            f"trainer.strategy.shard_group_size={group} must divide the {world} data-parallel "
            "ranks; e.g. the GPUs of a node"
        )
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(
        device_type, (world // group, group), mesh_dim_names=("replicate", "shard")
    )


def parallelize(
    model: Llama,
    *,
    lora_rank: int | None = None,
    lora_alpha: float = LORA_ALPHA,
    lora_targets=LORA_TARGETS,
    float8: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
    mesh=None,
    bf16: bool = False,
    reshard_after_forward: bool = True,
    device: torch.device | str | None = None,
) -> Llama:
    """LoRA adapters (`lora_rank`: everything else frozen) or float8 linear layers, then
    checkpointing, then compile, then FSDP2 over `mesh` (bf16 compute when `bf16`), then, for a
    model still on the meta device, its weights allocated on `device` and initialised
    (TinyLlama's init, sharded: each rank initialises only its shard). Returns the same model."""
    if lora_rank is not None:
        check_lora(lora_rank, lora_alpha, lora_targets, float8)
        apply_lora(model, lora_rank, lora_alpha, lora_targets)
    if float8:
        check_float8(device)
        apply_float8(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    if mesh is not None:
        policy = bf16_mixed_policy() if bf16 else None
        apply_fsdp2(model, mesh, reshard_after_forward, mp_policy=policy)
    if model.embed.weight.is_meta:
        model.to_empty(device=device or "cpu")
        model.init_weights()
    return model

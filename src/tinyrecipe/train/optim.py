"""AdamW parameter groups and the warmup + cosine learning-rate schedule (the one place each lives)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def warmup_cosine_lr(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int
) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup from 0 over `warmup_steps`,
    cosine decay to `min_lr` at `max_steps`, then `min_lr`.

    Counted in optimizer steps, not micro-batches (TinyLlama's script counted micro-steps, so
    its schedule ran gradient_accumulation times too fast: their issue #172).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def adamw_param_groups(
    model: nn.Module, weight_decay: float, decay_norms_and_embeddings: bool
) -> list[dict]:
    """One group (TinyLlama decays every parameter) or two: matrices decayed, norms and
    embeddings not (the litgpt/nanoGPT convention)."""
    if decay_norms_and_embeddings:
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": weight_decay,
            }
        ]
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    decay_norms_and_embeddings: bool = True,
    kernel: str = "auto",
) -> torch.optim.AdamW:
    """AdamW with the chosen kernel: "fused" (one kernel for all parameters; CUDA and CPU),
    "foreach" (batched ops), "for-loop" (PyTorch's per-parameter reference), or "auto" = fused.
    Only the fused kernel skips a non-finite step on the device (`tinyrecipe.train.step`)."""
    kwargs = {
        "auto": {"fused": True},
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }.get(kernel)
    if kwargs is None:
        raise ValueError(
            f"unknown AdamW kernel {kernel!r} (model.optimizer_kernel); "
            "use 'auto', 'fused', 'foreach' or 'for-loop'"
        )
    groups = adamw_param_groups(model, weight_decay, decay_norms_and_embeddings)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)

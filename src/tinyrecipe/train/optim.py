"""AdamW parameter groups and the learning-rate schedules (the one place each lives)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class Schedule:
    """Warmup, a constant phase, a decay, then `min_lr`: every schedule tinyrecipe runs.

    cosine (TinyLlama's): the decay starts when warmup ends and lasts until `max_steps`.
    wsd (warmup-stable-decay): the decay lasts `decay_steps` and starts at `decay_start`
        (by default `max_steps - decay_steps`): a cooldown branch from any stable-phase
        checkpoint sets `decay_start` to its step.
    constant: no decay.
    Counted in optimizer steps, not micro-batches (TinyLlama's script counted micro-steps, so
    its schedule ran gradient_accumulation times too fast: their issue #172).
    """

    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_start: int | None  # None: never decays
    decay_steps: int
    shape: str

    def lr(self, step: int) -> float:
        """The learning rate at optimizer step `step` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.decay_start is None or step < self.decay_start:
            return self.max_lr
        progress = min(1.0, (step - self.decay_start) / max(1, self.decay_steps))
        if self.shape == "cosine":
            left = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.shape == "1-sqrt":
            left = 1.0 - math.sqrt(progress)
        else:
            left = 1.0 - progress
        return self.min_lr + left * (self.max_lr - self.min_lr)


def build_schedule(
    kind: str,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int | None,
    decay_steps: int | None = None,
    decay_fraction: float | None = None,
    decay_shape: str | None = None,
    decay_from: int | None = None,
) -> Schedule:
    """The `Schedule` a recipe's model keys describe (`model.schedule`), each
    inconsistency refused in one line that names the key."""
    if kind not in SCHEDULES:
        raise ValueError(
            f"model.schedule.name {kind!r} is unknown; use one of {', '.join(SCHEDULES)}"
        )
    shape = decay_shape or ("cosine" if kind == "cosine" else "linear")
    if shape not in DECAY_SHAPES:
        raise ValueError(
            f"model.schedule.decay_shape {shape!r} is unknown; use one of {', '.join(DECAY_SHAPES)}"
        )
    if kind == "constant":
        return Schedule(max_lr, min_lr, warmup_steps, None, 0, shape)
    if max_steps is None or max_steps < 0:
        raise ValueError(
            f"set trainer.max_steps (or model.schedule.max_steps): the {kind} schedule needs its length"
        )
    if kind == "cosine":
        if decay_steps or decay_fraction or decay_from is not None:
            raise ValueError(
                "model.schedule.decay_steps/decay_fraction/decay_from belong to model.schedule.name: wsd; the "
                "cosine schedule decays from the end of warmup to trainer.max_steps"
            )
        return Schedule(max_lr, min_lr, warmup_steps, warmup_steps, max_steps - warmup_steps, shape)
    if (decay_steps is None) == (decay_fraction is None):
        raise ValueError(
            "model.schedule.name wsd needs exactly one of model.schedule.decay_steps (optimizer steps) or "
            "model.schedule.decay_fraction (of trainer.max_steps)"
        )
    length = decay_steps if decay_steps is not None else round(decay_fraction * max_steps)
    start = max_steps - length if decay_from is None else decay_from
    if length < 0 or start < 0 or start + length > max_steps:
        raise ValueError(
            f"the wsd decay (steps {start} to {start + length}) must end by trainer.max_steps "
            f"{max_steps}; set trainer.max_steps to model.schedule.decay_from + the decay length"
        )
    return Schedule(max_lr, min_lr, warmup_steps, start, length, shape)


def warmup_cosine_lr(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int
) -> float:
    """TinyLlama's schedule: linear warmup from 0 over `warmup_steps`, cosine decay to `min_lr`
    at `max_steps`, then `min_lr` (the `cosine` `Schedule`)."""
    return build_schedule("cosine", max_lr, min_lr, warmup_steps, max_steps).lr(step)


def adamw_param_groups(
    model: nn.Module, weight_decay: float, decay_norms_and_embeddings: bool
) -> list[dict]:
    """One group (TinyLlama decays every parameter) or two: matrices decayed, norms and
    embeddings not (OLMo's `decay_norm_and_bias`/`decay_embeddings` off)."""
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
            f"unknown AdamW kernel {kernel!r} (model.optimizer.kernel); "
            "use 'auto', 'fused', 'foreach' or 'for-loop'"
        )
    groups = adamw_param_groups(model, weight_decay, decay_norms_and_embeddings)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


ADAMW_SETTINGS = ("betas", "eps", "weight_decay")


class RecipeLR(LambdaLR):
    """A LambdaLR whose checkpoint restores its step only: the base learning rates and, through
    `set_scheduled_lr`, AdamW's betas, eps and weight decay stay this recipe's."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda) -> None:
        self.recipe_settings = [{k: g[k] for k in ADAMW_SETTINGS} for g in optimizer.param_groups]
        super().__init__(optimizer, lr_lambda)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "recipe_settings"}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "base_lrs"})


def set_scheduled_lr(scheduler: RecipeLR) -> None:
    """After a resume: each parameter group takes this recipe's AdamW settings and the schedule's
    learning rate at the scheduler's step; AdamW's moments and step come from the checkpoint."""
    for group, base, factor, settings in zip(
        scheduler.optimizer.param_groups,
        scheduler.base_lrs,
        scheduler.lr_lambdas,
        scheduler.recipe_settings,
        strict=True,
    ):
        group.update(settings, initial_lr=base, lr=base * factor(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

"""Whether a checkpoint fits a run: the model's shape and the LoRA setting, each refusal one line
naming both sides."""

from __future__ import annotations

from tinyrecipe.checkpoint.read import config_from_hparams
from tinyrecipe.model import ModelConfig
from tinyrecipe.model.config import SHAPE_FIELDS
from tinyrecipe.model.lora import LORA_TARGETS, lora_of


def shape_diff(theirs: ModelConfig, ours: ModelConfig) -> str:
    """'n_layer 2 vs 3, ...' over the shape fields that differ; '' when the weights fit."""
    return ", ".join(
        f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}"
        for k in SHAPE_FIELDS
        if getattr(theirs, k) != getattr(ours, k)
    )


def lora_setting(hparams) -> str | None:
    """'rank 8, alpha 16, targets ...' of a module's (or a checkpoint's) LoRA settings; None: off."""
    if (lora := lora_of(hparams)) is None:
        return None
    group = hparams.get("lora")
    targets = group.get("targets") if isinstance(group, dict) else hparams.get("lora_targets")
    return f"rank {lora[0]}, alpha {lora[1]:g}, targets {', '.join(targets or LORA_TARGETS)}"


def check_resume(theirs: dict, ours: dict, config: ModelConfig) -> None:
    """Refuse, in one line, to resume a checkpoint (its hyper-parameters `theirs`) into a run of
    hyper-parameters `ours` and model `config` of another shape or LoRA setting."""
    if detail := shape_diff(config_from_hparams(theirs), config):
        raise ValueError(
            f"checkpoint holds another model ({detail}, checkpoint vs recipe); resume with the "
            "recipe that wrote it or start without --ckpt_path"
        )
    if (lora := lora_setting(theirs)) != lora_setting(ours):
        raise ValueError(
            f"checkpoint was trained with LoRA {lora or 'off'}, the recipe says "
            f"{lora_setting(ours) or 'off'}; resume with the same model.lora settings, "
            "or start a new run from it with model.init_from (adapters merged)"
        )

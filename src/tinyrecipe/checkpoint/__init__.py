"""Checkpoints, in one package: reading every form tinyrecipe knows (a Lightning or Fabric file,
a sharded FSDP2 directory, a `convert from-hf` file, a Hugging Face directory; LoRA runs merged)
(`read`); whether one fits a run (`compat`); and the Trainer's files written whole, the fall-back
past damaged ones, `--ckpt_path auto` and the refusals before a run starts (`resume`)."""

from tinyrecipe.checkpoint.compat import check_resume, lora_setting, shape_diff
from tinyrecipe.checkpoint.read import (
    checkpoint_config,
    checkpoint_lora,
    checkpoint_meta,
    checkpoint_step,
    config_from_hparams,
    load_hf_state_dict,
    load_tinyrecipe_checkpoint,
    save_tinyrecipe_checkpoint,
)
from tinyrecipe.checkpoint.resume import (
    AtomicCheckpointIO,
    check_fit_start,
    checkpoint_problem,
    load_with_fallback,
    refuse_new_run_into,
    refuse_sharded,
    resolve_auto_resume,
    sharded_problem,
)

__all__ = [
    "AtomicCheckpointIO",
    "check_fit_start",
    "check_resume",
    "checkpoint_config",
    "checkpoint_lora",
    "checkpoint_meta",
    "checkpoint_problem",
    "checkpoint_step",
    "config_from_hparams",
    "load_hf_state_dict",
    "load_tinyrecipe_checkpoint",
    "load_with_fallback",
    "lora_setting",
    "refuse_new_run_into",
    "refuse_sharded",
    "resolve_auto_resume",
    "save_tinyrecipe_checkpoint",
    "shape_diff",
    "sharded_problem",
]

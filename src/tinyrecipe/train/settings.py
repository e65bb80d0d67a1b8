"""The training settings of a recipe's `model:` section, grouped by concern, as typed dataclasses
that LightningCLI parses and validates (`--print_config` shows them grouped):

    model:
      preset: tinyllama-1.1b
      config: {loss_chunk_size: 4096}        # the architecture (ModelConfig fields)
      init_from: out/start.ckpt              # weights to start from
      optimizer: {lr: 4.0e-4, weight_decay: 0.1}
      schedule: {name: cosine, min_lr: 4.0e-5, warmup_steps: 2000}
      guard: {nonfinite: stop, spike_sigma: 6}
      speed: {compile: true, meta_init: true}
      lora: {rank: 8}

`ModelSettings` holds a whole section; `train.build` makes the model, optimizer and schedule
from it for both loops. A key of the former flat layout (`model.lr`) is refused in one line
naming its place (`moved_key`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tinyrecipe.model.config import DEFAULT_PRESET, ModelConfig, overrides_dict, resolve_config
from tinyrecipe.model.lora import LORA_ALPHA, LORA_TARGETS, check_lora


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW. `decay_norms_and_embeddings`: True decays every parameter (TinyLlama); False exempts
    norms and embeddings. `kernel`: "auto" (fused), "fused", "foreach" or "for-loop"."""

    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = True
    kernel: str = "auto"


@dataclass(frozen=True)
class ScheduleSettings:
    """The learning rate per optimizer step (`train.optim.Schedule`): `name` "cosine" (warmup,
    then cosine to `min_lr` at `max_steps`), "wsd" (warmup-stable-decay) or "constant".
    `max_steps` None: the Trainer's. The wsd decay: its length (`decay_steps`, or
    `decay_fraction` of max_steps), its shape ("linear", "cosine", "1-sqrt"), and where it starts
    (`decay_from`; default: so that it ends at max_steps): a step, or a checkpoint whose step it
    is (a cooldown branch resumed from that checkpoint)."""

    name: str = "cosine"
    min_lr: float = 4e-5
    warmup_steps: int = 2000
    max_steps: int | None = None
    decay_steps: int | None = None
    decay_fraction: float | None = None
    decay_shape: str | None = None
    decay_from: int | str | None = None


@dataclass(frozen=True)
class StepGuard:
    """What happens to a bad optimizer step. `nonfinite`: a step whose loss or gradient is
    NaN/inf is skipped (no update); then "stop" ends the run naming the step (weights and the
    last checkpoint intact), "skip" warns and goes on (train/skipped_steps counts them).
    `spike_sigma`: skip a step whose loss or gradient norm exceeds the mean + spike_sigma x std of
    the last `spike_window` accepted steps (None: off; train/spike_skips counts them). Clipping
    is `trainer.gradient_clip_val`."""

    nonfinite: str = "stop"
    spike_sigma: float | None = None
    spike_window: int = 128


@dataclass(frozen=True)
class SpeedSettings:
    """Speed and memory switches, all off by default (the chunked loss is
    `config.loss_chunk_size`). `compile`: torch.compile per decoder block. `activation_
    checkpointing`: recompute each block's activations in backward. `float8`: the blocks' linear
    layers compute in float8 (torchao, GPUs of compute capability 8.9+). `meta_init`: build on
    the meta device and materialise already sharded (large models)."""

    compile: bool = False
    activation_checkpointing: bool = False
    float8: bool = False
    meta_init: bool = False


@dataclass(frozen=True)
class LoRASettings:
    """LoRA fine-tuning (`model.lora`): the decoder frozen, a rank-`rank` update scaled by
    `alpha / rank` trained on each block's `targets` (default all four linear layers). `rank`
    None: off, every parameter trains."""

    rank: int | None = None
    alpha: float = LORA_ALPHA
    targets: tuple[str, ...] | None = None

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(self.targets or LORA_TARGETS)


OPTIMIZER, SCHEDULE, GUARD, SPEED, NO_LORA = (
    OptimizerSettings(),
    ScheduleSettings(),
    StepGuard(),
    SpeedSettings(),
    LoRASettings(),
)
GROUPS = {
    "optimizer": OptimizerSettings,
    "schedule": ScheduleSettings,
    "guard": StepGuard,
    "speed": SpeedSettings,
    "lora": LoRASettings,
}

# The former flat `model.<key>` -> its place now.
MOVED = {
    "lr": "optimizer.lr",
    "betas": "optimizer.betas",
    "eps": "optimizer.eps",
    "weight_decay": "optimizer.weight_decay",
    "decay_norms_and_embeddings": "optimizer.decay_norms_and_embeddings",
    "optimizer_kernel": "optimizer.kernel",
    "min_lr": "schedule.min_lr",
    "warmup_steps": "schedule.warmup_steps",
    "max_steps": "schedule.max_steps",
    "decay_steps": "schedule.decay_steps",
    "decay_fraction": "schedule.decay_fraction",
    "decay_shape": "schedule.decay_shape",
    "decay_from": "schedule.decay_from",
    "nonfinite_loss": "guard.nonfinite",
    "spike_sigma": "guard.spike_sigma",
    "spike_window": "guard.spike_window",
    "compile": "speed.compile",
    "activation_checkpointing": "speed.activation_checkpointing",
    "float8": "speed.float8",
    "meta_init": "speed.meta_init",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_targets": "lora.targets",
}


def moved_key(key: str, value: Any = None) -> str | None:
    """The new place of a former flat `model.<key>` (a string `schedule` is now schedule.name);
    None for a key of the current layout."""
    if key == "schedule" and isinstance(value, str):
        return "schedule.name"
    return MOVED.get(key)


def _group(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if hasattr(value, "as_dict"):  # jsonargparse's Namespace
        value = value.as_dict()
    value = dict(value)
    if cls is LoRASettings and value.get("targets") is not None:
        value["targets"] = tuple(value["targets"])
    if cls is OptimizerSettings and value.get("betas") is not None:
        value["betas"] = tuple(value["betas"])
    return cls(**value)


@dataclass(frozen=True)
class ModelSettings:
    """A recipe's whole `model:` section: the architecture (`preset` + `config` overrides),
    `init_from`, and the grouped training settings."""

    preset: str = DEFAULT_PRESET
    config: dict = field(default_factory=dict)
    init_from: str | None = None
    optimizer: OptimizerSettings = OPTIMIZER
    schedule: ScheduleSettings = SCHEDULE
    guard: StepGuard = GUARD
    speed: SpeedSettings = SPEED
    lora: LoRASettings = NO_LORA

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            object.__setattr__(self, name, _group(cls, getattr(self, name)))
        object.__setattr__(self, "config", overrides_dict(self.config) or {})
        check_lora(self.lora.rank, self.lora.alpha, self.lora.target_names, self.speed.float8)

    @classmethod
    def from_dict(cls, section: dict) -> ModelSettings:
        """From a parsed recipe's `model:` dict; a former flat key is refused in one line."""
        for key, value in section.items():
            if (new := moved_key(key, value)) is not None:
                raise ValueError(f"model.{key} is now model.{new}; move it there")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in known})

    @property
    def model_config(self) -> ModelConfig:
        return resolve_config(self.preset, self.config)

    def as_dict(self) -> dict:
        """Plain values only (a checkpoint's `hyper_parameters`: weights_only loading reads no
        dataclasses)."""
        out = {"preset": self.preset, "config": dict(self.config), "init_from": self.init_from}
        for name in GROUPS:
            group = asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        return out

"""What both training loops make from a recipe's `model:` section (`ModelSettings`): the decoder
(with `init_from`'s weights, LoRASettings, float8, activation checkpointing, compile and FSDP2 as the
settings say), AdamW and its schedule, the step guards, and the line a run prints about its
speed paths. `CausalLMModule` (the Trainer path) and `train.fabric` call these; neither builds
anything itself."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tinyrecipe.checkpoint import checkpoint_step, load_tinyrecipe_checkpoint, shape_diff
from tinyrecipe.model import Llama
from tinyrecipe.model.attention import select_backend, trains_attention_in_fp32
from tinyrecipe.model.lora import lora_params
from tinyrecipe.model.parallelize import parallelize
from tinyrecipe.planning.flops import compute_dtype
from tinyrecipe.train.optim import RecipeLR, build_adamw, build_schedule
from tinyrecipe.train.settings import ModelSettings
from tinyrecipe.train.step import NonFiniteGuard, SpikeSkipper

FSDP1_REFUSED = (
    "trainer.strategy FSDPStrategy (FSDP1) is not supported; use 'fsdp2' "
    "(tinyrecipe.train.strategy.FSDP2Strategy)"
)


def refuse_fsdp1(spec) -> None:
    """FSDP1 (`fsdp`, `FSDPStrategy`) in a recipe's strategy, refused in one line: its flat
    sharded gradients would be normed as if replicated, and it reduces on every micro-batch."""
    name = spec.get("class_path", "") if isinstance(spec, dict) else str(spec or "")
    if name == "fsdp" or name.rpartition(".")[2] == "FSDPStrategy":
        raise ValueError(FSDP1_REFUSED)


def build_model(
    settings: ModelSettings,
    mesh=None,
    bf16: bool = False,
    device=None,
    reshard_after_forward: bool = True,
) -> Llama:
    """The decoder of `settings`, with init_from's weights, then `model.parallelize` (LoRASettings or
    float8, activation checkpointing, compile, FSDP2 over `mesh`)."""
    config, speed, lora = settings.model_config, settings.speed, settings.lora
    if settings.init_from and speed.meta_init:
        raise ValueError(
            "model.init_from needs model.speed.meta_init: false (weights load before sharding)"
        )
    with torch.device("meta") if speed.meta_init else nullcontext():
        model = Llama(config)
    if settings.init_from:
        theirs, state = load_tinyrecipe_checkpoint(settings.init_from)
        if detail := shape_diff(theirs, config):
            raise ValueError(
                f"model.init_from '{settings.init_from}' holds a different model ({detail}, "
                "checkpoint vs recipe); set model.preset/model.config to its shape"
            )
        model.load_state_dict(state)
    return parallelize(
        model,
        lora_rank=lora.rank,
        lora_alpha=lora.alpha,
        lora_targets=lora.target_names,
        float8=speed.float8,
        activation_checkpointing=speed.activation_checkpointing,
        compile=speed.compile,
        mesh=mesh,
        bf16=bf16,
        reshard_after_forward=reshard_after_forward,
        device=device,
    )


def build_optimizer(
    model: torch.nn.Module, settings: ModelSettings, max_steps: int | None = None
) -> tuple[torch.optim.Optimizer, RecipeLR]:
    """AdamW over `model` and its schedule as a `RecipeLR` stepped per optimizer step
    (`schedule.max_steps`, else `max_steps`: the loop's)."""
    opt, sched = settings.optimizer, settings.schedule
    optimizer = build_adamw(
        model,
        opt.lr,
        opt.betas,
        opt.eps,
        opt.weight_decay,
        opt.decay_norms_and_embeddings,
        opt.kernel,
    )
    decay_from = sched.decay_from
    if isinstance(decay_from, str):  # a checkpoint: the cooldown branches at its step
        decay_from = checkpoint_step(decay_from)
    schedule = build_schedule(
        sched.name,
        opt.lr,
        sched.min_lr,
        sched.warmup_steps,
        sched.max_steps or max_steps,
        sched.decay_steps,
        sched.decay_fraction,
        sched.decay_shape,
        decay_from,
    )

    def factor(step: int) -> float:
        return schedule.lr(step) / opt.lr

    return optimizer, RecipeLR(optimizer, factor)


def build_guards(settings: ModelSettings) -> tuple[NonFiniteGuard, SpikeSkipper | None]:
    """The non-finite step policy and the spike skipper (None when off) of `settings.guard`."""
    guard = settings.guard
    spikes = SpikeSkipper(guard.spike_sigma, guard.spike_window) if guard.spike_sigma else None
    return NonFiniteGuard(guard.nonfinite), spikes


def adapter_params(settings: ModelSettings) -> int:
    """Trainable LoRA adapter parameters of `settings` (0: no LoRA, every parameter trains)."""
    lora = settings.lora
    return lora_params(settings.model_config, lora.rank, lora.target_names)


def describe(settings: ModelSettings, precision: str, device: torch.device) -> str:
    """The one line a run prints about which speed paths it takes."""
    probe = torch.empty(0, device=device, dtype=compute_dtype(precision))
    cfg, speed = settings.model_config, settings.speed
    lora = ""
    if trainable := adapter_params(settings):
        lora = f" ({trainable / 1e6:.2f}M trainable: lora r={settings.lora.rank})"
    compiled_loss = cfg.loss_chunk_size and speed.compile and probe.dtype != torch.float32
    attention = select_backend(probe, cfg.attention)
    if attention == "sdpa" and trains_attention_in_fp32(
        device.type, probe.dtype, cfg.block_size, cfg.head_dim
    ):
        attention += "(fp32 in training)"
    return (
        f"tinyrecipe: {cfg.num_params() / 1e6:.1f}M params{lora}, "
        f"attention={attention}, "
        f"compile={'per-block' if speed.compile else 'off'}, "
        f"activation_checkpointing={speed.activation_checkpointing}, "
        f"linear={'float8' if speed.float8 else 'plain'}, "
        f"loss={f'chunked({cfg.loss_chunk_size})' if cfg.loss_chunk_size else 'plain'}"
        f"{'+compiled' if compiled_loss else ''}, "
        f"adamw={settings.optimizer.kernel}, precision={precision}"
    )

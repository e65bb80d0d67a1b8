"""`tinyrecipe plan`: the model size and training length that reach a target loss for the least
lifetime compute (training + inference), after Sardana & Frankle (arXiv 2401.00448).

    tinyrecipe plan --chinchilla-params 7e9 --inference-tokens 1e11
    tinyrecipe plan --target-loss 2.18 --inference-tokens 2e13 --json
    tinyrecipe plan --target-loss 2.18 --inference-tokens 2e13 \\
        --price-per-gpu-hour 2.0 --gpu-peak-flops 989e12 --output-fraction 0.2
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from tinyrecipe.io import atomic_write
from tinyrecipe.model import ModelConfig
from tinyrecipe.model.config import DEFAULT_PRESET, resolve_config
from tinyrecipe.planning.memory import recipe_memory
from tinyrecipe.planning.scaling import (
    CHINCHILLA,
    LossFit,
    Plan,
    inference_optimal,
)


def plan_summary(
    target_loss: float, inference_tokens: float, fit: LossFit = CHINCHILLA
) -> tuple[Plan, Plan, dict]:
    """(inference-aware plan, Chinchilla-optimal plan at the same loss and demand, JSON dict)."""
    best = inference_optimal(target_loss, inference_tokens, fit)
    chin = inference_optimal(target_loss, 0.0, fit)
    chin = Plan(chin.n_params, chin.train_tokens, inference_tokens, chin.loss)
    summary = {
        "target_loss": target_loss,
        "loss": best.loss,
        "inference_tokens": inference_tokens,
        "n_params": best.n_params,
        "train_tokens": best.train_tokens,
        "tokens_per_param": best.tokens_per_param,
        "train_flops": best.train_flops,
        "inference_flops": best.inference_flops,
        "total_flops": best.total_flops,
        "chinchilla_n_params": chin.n_params,
        "chinchilla_train_tokens": chin.train_tokens,
        "chinchilla_total_flops": chin.total_flops,
        "flops_saving": 1 - best.total_flops / chin.total_flops,
    }
    return best, chin, summary


def pick_shape(n_params: float, vocab_size: int = 32000, block_size: int = 2048) -> ModelConfig:
    """The `ModelConfig.from_shape` (TinyLlama's rules) nearest n_params: d_model a multiple of
    128, depth with d_model / n_layer between 64 and 160 (TinyLlama: 93, Llama-2 7B: 128)."""
    best, best_key = None, None
    for d_model in range(256, 16384 + 1, 128):
        for n_layer in range(max(1, -(-d_model // 160)), d_model // 64 + 1):
            config = ModelConfig.from_shape(
                d_model, n_layer, vocab_size=vocab_size, block_size=block_size
            )
            key = (
                round(abs(math.log(config.num_params() / n_params)), 3),
                abs(d_model / n_layer - 96),
            )
            if best_key is None or key < best_key:
                best, best_key = config, key
    return best


def fit_memory(recipe: dict, limit_gib: float) -> tuple[float, bool]:
    """Make `recipe` (a parsed recipe dict, changed in place) fit `limit_gib` per device by the
    memory estimate: activation checkpointing first, then halving the micro-batch (the tokens
    per step stay: global_batch_size, the accumulation follows). Returns (estimate GiB, fits)."""
    model, data, trainer = recipe["model"], recipe["data"], recipe["trainer"]
    micro = data["batch_size"]
    if not recipe.get("global_batch_size"):
        devices = trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1
        recipe["global_batch_size"] = (
            trainer.get("num_nodes", 1)
            * devices
            * micro
            * trainer.get("accumulate_grad_batches", 1)
        )
        trainer.pop("accumulate_grad_batches", None)
    tried = []
    for checkpointing, batch in [(False, micro)] + [
        (True, micro >> k) for k in range(micro.bit_length())
    ]:
        model.setdefault("speed", {})["activation_checkpointing"] = checkpointing
        data["batch_size"] = batch
        gib = recipe_memory(recipe)[0].total / 2**30
        tried.append(gib)
        if gib <= limit_gib:
            return gib, True
    return tried[-1], False


def emit_recipe(
    plan: Plan, base: str | Path, out: str | Path, gpu_memory_gib: float | None = 80.0
) -> dict:
    """Write a recipe: `base` (a recipe file) with the model shape nearest plan.n_params,
    max_steps covering plan.train_tokens at the base recipe's tokens per step, its own output
    directory (`out/<recipe name>`), and, with `gpu_memory_gib`, activation checkpointing and a
    micro-batch that the memory estimate says fit that much per device (a warning when none
    does)."""
    import warnings

    base = Path(base)
    if not base.is_file():
        raise FileNotFoundError(
            f"base recipe '{base}' does not exist; pass --base recipes/<name>.yaml"
        )
    recipe = yaml.safe_load(base.read_text())
    model, trainer, data = recipe["model"], recipe["trainer"], recipe["data"]
    current = resolve_config(model.get("preset", DEFAULT_PRESET), model.get("config"))
    shape = pick_shape(plan.n_params, current.vocab_size, current.block_size)
    model["config"] = dict(
        model.get("config") or {},
        **{k: getattr(shape, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")},
    )
    trainer["default_root_dir"] = f"out/{Path(out).stem}"
    sequences = recipe.get("global_batch_size") or (
        trainer.get("num_nodes", 1)
        * (trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1)
        * data["batch_size"]
        * trainer.get("accumulate_grad_batches", 1)
    )
    tokens_per_step = sequences * data["block_size"]
    trainer["max_steps"] = math.ceil(plan.train_tokens / tokens_per_step)
    fits = True
    if gpu_memory_gib:
        _, fits = fit_memory(recipe, gpu_memory_gib)
    memory, _ = recipe_memory(recipe)
    if abs(math.log(shape.num_params() / plan.n_params)) > math.log(1.1):
        warnings.warn(
            f"the nearest shape has {shape.num_params():,} parameters against the plan's "
            f"{plan.n_params:,.0f} (the shape rules allow no closer one); its loss at "
            f"{plan.train_tokens:.3g} tokens is not the plan's",
            stacklevel=2,
        )
    if not fits:
        warnings.warn(
            f"no micro-batch fits {gpu_memory_gib:g} GiB per device for this "
            f"{shape.num_params() / 1e9:.2f}B model (the estimate is {memory.total / 2**30:.1f} GiB "
            "at micro-batch 1 with activation checkpointing); use more devices or larger ones",
            stacklevel=2,
        )
    header = (
        f"# Emitted by `tinyrecipe plan` from {base}: {shape.num_params():,} parameters "
        f"(optimum {plan.n_params:,.0f}), {plan.train_tokens:,.0f} training tokens = "
        f"{trainer['max_steps']:,} steps x {tokens_per_step:,} tokens, predicted loss {plan.loss:.4f}.\n"
        f"# Memory per device (tinyrecipe memory): {memory.total / 2**30:.1f} GiB"
        + (f" (fitted to {gpu_memory_gib:g} GiB).\n" if gpu_memory_gib else ".\n")
    )
    out = atomic_write(out, header + yaml.safe_dump(recipe, sort_keys=False))
    return {
        "memory_per_device_gib": memory.total / 2**30,
        "fits": fits,
        "micro_batch": data["batch_size"],
        "activation_checkpointing": bool(
            (model.get("speed") or {}).get("activation_checkpointing")
        ),
        "path": str(out),
        "n_params": shape.num_params(),
        "max_steps": trainer["max_steps"],
        "tokens_per_step": tokens_per_step,
        "shape": {
            k: getattr(shape, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")
        },
    }

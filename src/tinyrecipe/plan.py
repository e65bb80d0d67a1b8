"""`tinyrecipe plan`: the model size and training length that reach a target loss for the least
lifetime compute (training + inference), after Sardana & Frankle (arXiv 2401.00448).

    tinyrecipe plan --chinchilla-params 7e9 --inference-tokens 1e11
    tinyrecipe plan --target-loss 2.18 --inference-tokens 2e13 --json
    tinyrecipe plan --target-loss 2.18 --inference-tokens 2e13 \\
        --price-per-gpu-hour 2.0 --gpu-peak-flops 989e12 --output-fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from tinyrecipe.memory import recipe_memory
from tinyrecipe.model import ModelConfig
from tinyrecipe.scaling import (
    CHINCHILLA,
    CostModel,
    LossFit,
    Plan,
    chinchilla_loss,
    cost_optimal,
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
        for n_layer in range(max(1, d_model // 160), d_model // 64 + 1):
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


def emit_recipe(plan: Plan, base: str | Path, out: str | Path) -> dict:
    """Write a recipe: `base` (a recipe file) with the model shape nearest plan.n_params and
    max_steps covering plan.train_tokens at the base recipe's tokens per step."""
    base = Path(base)
    if not base.is_file():
        raise FileNotFoundError(
            f"base recipe '{base}' does not exist; pass --base recipes/<name>.yaml"
        )
    recipe = yaml.safe_load(base.read_text())
    model, trainer, data = recipe["model"], recipe["trainer"], recipe["data"]
    current = ModelConfig.from_name(
        model.get("preset", "tinyllama-1.1b"), **(model.get("config") or {})
    )
    shape = pick_shape(plan.n_params, current.vocab_size, current.block_size)
    model["config"] = dict(
        model.get("config") or {},
        **{k: getattr(shape, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")},
    )
    sequences = (
        trainer.get("num_nodes", 1)
        * (trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1)
        * data["batch_size"]
        * trainer.get("accumulate_grad_batches", 1)
    )
    tokens_per_step = sequences * data["block_size"]
    trainer["max_steps"] = math.ceil(plan.train_tokens / tokens_per_step)
    header = (
        f"# Emitted by `tinyrecipe plan` from {base}: {shape.num_params():,} parameters "
        f"(optimum {plan.n_params:,.0f}), {plan.train_tokens:,.0f} training tokens = "
        f"{trainer['max_steps']:,} steps x {tokens_per_step:,} tokens, predicted loss {plan.loss:.4f}.\n"
    )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    tmp.replace(out)
    memory, _ = recipe_memory(recipe)
    return {
        "memory_per_device_gib": memory.total / 2**30,
        "path": str(out),
        "n_params": shape.num_params(),
        "max_steps": trainer["max_steps"],
        "tokens_per_step": tokens_per_step,
        "shape": {
            k: getattr(shape, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tinyrecipe plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--target-loss", type=float, help="loss to reach (nats/token under the fit)"
    )
    target.add_argument(
        "--chinchilla-params", type=float, help="match a Chinchilla-optimal model of N params"
    )
    parser.add_argument(
        "--inference-tokens", type=float, default=0.0, help="lifetime tokens served"
    )
    for name, default in zip(
        ("E", "A", "B", "alpha", "beta"), (1.69, 406.4, 410.7, 0.336, 0.283), strict=True
    ):
        parser.add_argument(
            f"--fit-{name.lower()}", type=float, default=default, help=f"loss fit {name}"
        )
    cost = parser.add_argument_group("cost (optional: minimise dollars instead of FLOPs)")
    cost.add_argument("--price-per-gpu-hour", type=float)
    cost.add_argument("--gpu-peak-flops", type=float, help="e.g. 989e12 for an H100 SXM (bf16)")
    cost.add_argument("--mfu-train", type=float, default=0.5)
    cost.add_argument("--mfu-input", type=float, default=0.5, help="MFU of prefill (input tokens)")
    cost.add_argument(
        "--mfu-output", type=float, default=0.05, help="MFU of decoding (output tokens)"
    )
    cost.add_argument(
        "--output-fraction", type=float, default=0.5, help="share of inference tokens generated"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--emit", metavar="RECIPE.yaml", help="write a runnable recipe for the optimum"
    )
    parser.add_argument(
        "--base", default="recipes/tinyllama-1.1b.yaml", help="recipe --emit starts from"
    )
    args = parser.parse_args(argv)

    fit = LossFit(args.fit_e, args.fit_a, args.fit_b, args.fit_alpha, args.fit_beta)
    try:
        loss = (
            args.target_loss
            if args.target_loss is not None
            else chinchilla_loss(args.chinchilla_params, fit)
        )
        best, chin, summary = plan_summary(loss, args.inference_tokens, fit)
        if args.price_per_gpu_hour is not None:
            if args.gpu_peak_flops is None:
                raise ValueError(
                    "--price-per-gpu-hour needs --gpu-peak-flops (the GPU's bf16 peak)"
                )
            model = CostModel(
                args.price_per_gpu_hour,
                args.gpu_peak_flops,
                args.mfu_train,
                args.mfu_input,
                args.mfu_output,
            )
            out_tokens = args.inference_tokens * args.output_fraction
            cheap, dollars = cost_optimal(
                loss, args.inference_tokens - out_tokens, out_tokens, model, fit
            )
            summary["cost"] = {
                "n_params": cheap.n_params,
                "train_tokens": cheap.train_tokens,
                "dollars": dollars,
            }
        if args.emit:
            summary["recipe"] = emit_recipe(best, args.base, args.emit)
    except (ValueError, FileNotFoundError) as err:
        print(f"tinyrecipe plan: {err}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"target loss {loss:.4f} (fit E={fit.E}, A={fit.A}, B={fit.B}, alpha={fit.alpha}, beta={fit.beta})"
    )
    print(f"lifetime inference: {args.inference_tokens:.3g} tokens\n")
    print(
        f"{'':24}{'params':>10}{'train tokens':>14}{'tok/param':>11}{'train FLOPs':>13}{'total FLOPs':>13}"
    )
    for name, p in (("inference-aware optimum", best), ("Chinchilla-optimal", chin)):
        print(
            f"{name:<24}{p.n_params / 1e9:>9.3f}B{p.train_tokens / 1e9:>13.1f}B{p.tokens_per_param:>11.1f}"
            f"{p.train_flops:>13.3e}{p.total_flops:>13.3e}"
        )
    print(f"\nFLOPs saved vs Chinchilla-optimal: {summary['flops_saving']:.1%}")
    if "cost" in summary:
        c = summary["cost"]
        print(
            f"cost optimum: {c['n_params'] / 1e9:.3f}B params on {c['train_tokens'] / 1e9:.1f}B tokens, ${c['dollars']:,.0f}"
        )
    if "recipe" in summary:
        r = summary["recipe"]
        print(
            f"recipe: {r['path']} ({r['n_params']:,} params, {r['shape']}, {r['max_steps']:,} steps)"
        )
        print(
            f"memory per device (estimate, `tinyrecipe memory --config {r['path']}`): "
            f"{r['memory_per_device_gib']:.1f} GiB"
        )
    return 0

"""`tinyrecipe plan`: the command line of `tinyrecipe.planning.plan`."""

from __future__ import annotations

import argparse
import json
import sys

from tinyrecipe.planning import plan as planning
from tinyrecipe.planning.lawfit import fitted_sizes, load_law
from tinyrecipe.planning.plan import emit_recipe, plan_summary
from tinyrecipe.planning.scaling import CostModel, LossFit, chinchilla_loss, cost_optimal


def _count(x: float) -> str:
    """1.234B, 56.8M, 12.3K: a count at the scale it has (a law fitted on small runs plans small
    models)."""
    for scale, unit, digits in ((1e9, "B", 3), (1e6, "M", 2), (1e3, "K", 1)):
        if x >= scale:
            return f"{x / scale:.{digits}f}{unit}"
    return f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="tinyrecipe plan",
        description=planning.__doc__,
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
    parser.add_argument(
        "--law", help="a law.json from `tinyrecipe fit-law` (replaces the --fit-* constants)"
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
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=80.0,
        help="--emit fits micro-batch and checkpointing to this per device (0: as the base)",
    )
    args = parser.parse_args(argv)

    fit = (
        load_law(args.law)
        if args.law
        else LossFit(args.fit_e, args.fit_a, args.fit_b, args.fit_alpha, args.fit_beta)
    )
    loss = (
        args.target_loss
        if args.target_loss is not None
        else chinchilla_loss(args.chinchilla_params, fit)
    )
    best, chin, summary = plan_summary(loss, args.inference_tokens, fit)
    sizes = fitted_sizes(args.law) if args.law else None
    if sizes and not sizes[0] <= best.n_params <= sizes[1]:
        print(
            f"tinyrecipe plan: note: {best.n_params:.3g} parameters is outside the sizes the law "
            f"was fitted on ({sizes[0]:.3g} to {sizes[1]:.3g}): an extrapolation, as far as its "
            "intervals (fit-law) allow",
            file=sys.stderr,
        )
    if args.price_per_gpu_hour is not None:
        if args.gpu_peak_flops is None:
            raise ValueError("--price-per-gpu-hour needs --gpu-peak-flops (the GPU's bf16 peak)")
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
    if args.emit:  # the dollar optimum when a price is given, else the FLOPs optimum
        chosen = cheap if args.price_per_gpu_hour is not None else best
        summary["recipe"] = emit_recipe(chosen, args.base, args.emit, args.gpu_memory_gib)

    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"target loss {loss:.4f} (fit E={fit.E:.4g}, A={fit.A:.4g}, B={fit.B:.4g}, "
        f"alpha={fit.alpha:.4g}, beta={fit.beta:.4g})"
    )
    print(f"lifetime inference: {args.inference_tokens:.3g} tokens\n")
    print(
        f"{'':24}{'params':>10}{'train tokens':>14}{'tok/param':>11}{'train FLOPs':>13}{'total FLOPs':>13}"
    )
    for name, p in (("inference-aware optimum", best), ("Chinchilla-optimal", chin)):
        print(
            f"{name:<24}{_count(p.n_params):>10}{_count(p.train_tokens):>14}"
            f"{p.tokens_per_param:>11.1f}{p.train_flops:>13.3e}{p.total_flops:>13.3e}"
        )
    print(f"\nFLOPs saved vs Chinchilla-optimal: {summary['flops_saving']:.1%}")
    if "cost" in summary:
        c = summary["cost"]
        print(
            f"cost optimum: {_count(c['n_params'])} params on {_count(c['train_tokens'])} tokens, "
            f"${c['dollars']:,.0f}"
        )
    if "recipe" in summary:
        r = summary["recipe"]
        print(
            f"recipe: {r['path']} ({r['n_params']:,} params, {r['shape']}, {r['max_steps']:,} steps)"
        )
        print(
            f"memory per device (estimate, `tinyrecipe memory --config {r['path']}`): "
            f"{r['memory_per_device_gib']:.1f} GiB at micro-batch {r['micro_batch']}"
            f"{', activation checkpointing' if r['activation_checkpointing'] else ''}"
            f"{'' if r['fits'] else ' -- DOES NOT FIT the GPU memory given'}"
        )
    return 0

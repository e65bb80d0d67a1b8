"""`tinyrecipe ladder --base BASE.yaml --sizes S1,S2,... --tokens-per-param T1,T2,...
--out DIR [--evals N]`: one overlay per model size and token budget (a preset such as
llama-60m, or a shape d<width>-l<depth>), run them with `tinyrecipe sweep --base BASE.yaml
DIR/*.yaml` (`tinyrecipe.experiments.ladder`)."""

from __future__ import annotations

import argparse
import shlex

from tinyrecipe.cli.fit import parse_recipe
from tinyrecipe.experiments.ladder import ladder, write_ladder


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe ladder", description=__doc__
    )
    parser.add_argument("--base", required=True)
    parser.add_argument("--sizes", required=True, help="comma-separated presets or dW-lL shapes")
    parser.add_argument("--tokens-per-param", required=True, help="comma-separated budgets")
    parser.add_argument("--out", required=True, help="directory for the overlays")
    parser.add_argument("--evals", type=int, default=8, help="validations per run")
    args = parser.parse_args(argv)
    recipe, _ = parse_recipe(["--config", args.base])
    try:
        budgets = [float(t) for t in args.tokens_per_param.split(",")]
    except ValueError:
        raise ValueError(
            f"--tokens-per-param {args.tokens_per_param!r} is not a list of numbers"
        ) from None
    rungs = ladder(recipe, args.sizes.split(","), budgets)
    command = shlex.join(["tinyrecipe", "ladder", *argv])
    paths = write_ladder(recipe, rungs, args.out, command, args.evals)
    print(f"{'rung':<22}{'params':>12}{'tokens':>12}{'steps':>9}")
    for rung in rungs:
        print(f"{rung.name:<22}{rung.n_params:>12,}{rung.tokens:>12.3g}{rung.max_steps:>9,}")
    print(
        f"wrote {len(paths)} overlays to {args.out}; run them: tinyrecipe sweep --base {args.base} "
        f"{args.out}/*.yaml --out runs/ladder"
    )
    return 0

"""`tinyrecipe fit-law RUN_DIR... --out law.json [--final-only] [--bootstrap N] [--plot F.png]`:
fit L(N, D) = E + A/N^alpha + B/D^beta to (parameters, tokens, validation loss) points along
each run's curve (Hoffmann et al.'s third approach, `tinyrecipe.planning.lawfit`), with
bootstrap intervals; `tinyrecipe plan --law law.json` then plans with it."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tinyrecipe.experiments.compare import log_x_axis
from tinyrecipe.experiments.runs import loss_points, read_run
from tinyrecipe.planning.lawfit import PARAMS, fit_law


def plot_fit(fit, path: Path) -> None:
    """The points and the fitted law's curve through each model size, loss against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tinyrecipe.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = np.array(fit.points)
    for n in sorted(set(points[:, 0])):
        mine = points[points[:, 0] == n]
        d = np.geomspace(mine[:, 1].min(), mine[:, 1].max(), 50)
        (line,) = ax.plot(d, [fit.law.loss(n, x) for x in d], label=f"{n / 1e6:.2f}M params")
        ax.scatter(mine[:, 1], mine[:, 2], color=line.get_color(), s=12)
    log_x_axis(ax)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    law = fit.law
    ax.set_title(
        f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _progress(done: int, total: int, seconds: float) -> None:
    """A line per tenth of the resamples, with the time left at the pace so far."""
    if done == total or done % max(1, total // 10) == 0:
        left = seconds / done * (total - done)
        print(
            f"fit-law: bootstrap {done}/{total} ({seconds:.0f} s, ~{left:.0f} s left)",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe fit-law", description=__doc__
    )
    parser.add_argument("runs", nargs="+", help="run directories (trainer.default_root_dir)")
    parser.add_argument("--out", default="law.json")
    parser.add_argument("--tag", default="val/loss", help="the loss curve to fit")
    parser.add_argument("--final-only", action="store_true", help="one point per run: its last")
    parser.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals")
    parser.add_argument("--plot", help="PNG of the fit against the points (default: beside --out)")
    args = parser.parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    points, names = loss_points(runs, args.tag, args.final_only)
    print(
        f"fit-law: {len(points)} points from {len(runs)} runs, then {args.bootstrap} bootstrap "
        "resamples",
        file=sys.stderr,
        flush=True,
    )
    fit = fit_law(points, names, bootstrap=args.bootstrap, progress=_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fit.save(out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_fit(fit, plot)
    print(f"{len(points)} points from {len(runs)} runs; L(N, D) = E + A/N^alpha + B/D^beta:")
    for key in PARAMS:
        lo, hi = fit.intervals[key]
        interval = (
            f"95% bootstrap [{lo:.5g}, {hi:.5g}]"
            if math.isfinite(lo)
            else "no interval (--bootstrap 0)"
        )
        print(f"  {key:<6} {getattr(fit.law, key):>12.5g}   {interval}")
    print(f"wrote {out} and {plot}; plan with it: tinyrecipe plan --law {out} --target-loss ...")
    return 0

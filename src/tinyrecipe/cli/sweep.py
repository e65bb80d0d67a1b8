"""`tinyrecipe sweep --base BASE.yaml OVERLAY.yaml... [--out runs/] [--seeds 1,2,3]
[--set key=value ...] [--slurm] [--only NAME] [--dry-run]`: each overlay on the base (and each
seed) in its own run directory `out/<overlay>[-seed<N>]`; finished runs are skipped,
interrupted ones resumed (`tinyrecipe.experiments.sweep`). Then `tinyrecipe compare out/*`."""

from __future__ import annotations

import argparse
import shlex

from tinyrecipe.experiments.sweep import plan_sweep, run_sweep, slurm_script


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe sweep", description=__doc__
    )
    parser.add_argument("--base", required=True, help="the recipe every run starts from")
    parser.add_argument("overlays", nargs="*", help="one run per overlay recipe")
    parser.add_argument("--out", default="runs", help="parent of the run directories")
    parser.add_argument("--seeds", help="comma-separated seeds: one run per overlay and seed")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override in every run"
    )
    parser.add_argument("--slurm", action="store_true", help="write an sbatch array script instead")
    parser.add_argument("--only", help="run only the run of this name")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ValueError(
            f"--seeds {args.seeds!r} is not a comma-separated list of integers"
        ) from None
    runs = plan_sweep(args.base, args.overlays, args.out, seeds, args.set)
    if args.only:
        runs = [r for r in runs if r.name == args.only]
        if not runs:
            raise ValueError(f"--only {args.only!r} names no run of this sweep")
    if args.slurm:
        path = slurm_script(runs, argv, args.out)
        print(
            f"wrote {path} ({len(runs)} array tasks); add your #SBATCH lines, then: sbatch {path}"
        )
        return 0
    if args.dry_run:
        for run in runs:
            print(f"{run.name} [{run.state()}]: {shlex.join(run.command())}")
        return 0
    failed = run_sweep(runs)
    done = len(runs) - len(failed)
    print(
        f"sweep: {done} of {len(runs)} runs done in {args.out}; compare them with: "
        f"tinyrecipe compare {' '.join(str(r.directory) for r in runs)}"
    )
    if failed:
        print(f"failed (run the sweep again to resume them): {', '.join(r.name for r in failed)}")
        return 1
    return 0

"""`tinyrecipe compare RUN_DIR... [--out report/]`: a table of the runs (what each recipe changes
against the baseline's: the runs named `base`, a sweep's base recipe, or `--baseline NAME`; tokens, FLOPs, validation losses, downstream scores, speed), PNG plots of
validation loss against tokens and FLOPs (seeds as bands) and `report.md` embedding them
(`tinyrecipe.experiments.compare`)."""

from __future__ import annotations

import argparse

from tinyrecipe.experiments.compare import report
from tinyrecipe.experiments.runs import read_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe compare", description=__doc__
    )
    parser.add_argument("runs", nargs="+", help="run directories (trainer.default_root_dir)")
    parser.add_argument("--out", default="report", help="where report.md and the plots go")
    parser.add_argument(
        "--baseline", help="the configuration the others are measured against (default: base)"
    )
    args = parser.parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    text, files = report(runs, args.out, args.baseline)
    print(text)
    print(f"\nreport: {files[0]} (plots: {', '.join(f.name for f in files[1:])})")
    return 0

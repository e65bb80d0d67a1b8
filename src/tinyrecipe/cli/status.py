"""`tinyrecipe status RUN_DIR [--json]`: where a run stands, from its journal (`journal.jsonl`,
`tinyrecipe.train.journal`): step, tokens, the loss of the last logging steps, tokens/s and ETA,
the last checkpoint, sessions and restarts, and goodput (the share of wall time spent in steps
that counted)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tinyrecipe.train.journal import JOURNAL, describe_status, read_journal, run_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe status", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", help="a run directory (trainer.default_root_dir)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    events = read_journal(args.run_dir)
    if not events:
        raise FileNotFoundError(
            f"'{Path(args.run_dir) / JOURNAL}' does not exist or is empty; pass the directory a "
            "run trains in (its trainer.default_root_dir)"
        )
    status = run_status(events)
    if args.json:
        print(json.dumps(dict(asdict(status), goodput=status.goodput), indent=1))
    else:
        print(describe_status(status, args.run_dir))
    return 0

"""`tinyrecipe eval`: lm-evaluation-harness tasks on any checkpoint tinyrecipe reads
(`tinyrecipe.evaluation`).

    tinyrecipe eval --ckpt out/quickstart/checkpoints/last.ckpt --tokenizer data/quickstart/tokenizer \\
        --include-path data/quickstart/eval --tasks stdlib_mc
    tinyrecipe eval --ckpt path/to/TinyLlama-1.1B --tokenizer path/to/TinyLlama-1.1B \\
        --tasks tinyllama-commonsense --json scores.json
"""

from __future__ import annotations

import argparse
import json

from tinyrecipe.cli.generate import add_model_arguments, load_model
from tinyrecipe.data.tokenizer import load_tokenizer
from tinyrecipe.evaluation import TinyRecipeLM, evaluate, table
from tinyrecipe.io import atomic_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="tinyrecipe eval",
        description="Score a checkpoint on lm-evaluation-harness tasks (zero-shot unless "
        "--num-fewshot).",
    )
    add_model_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated tasks or groups")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (a quick look)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--include-path", action="append", help="directory of task YAMLs")
    parser.add_argument("--json", help="write the scores to this file")
    parser.add_argument(
        "--no-bos", action="store_true", help="contexts without BOS (docs/evaluation.md)"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit {args.limit} must be a positive number of examples per task")
    lm = TinyRecipeLM(
        load_model(args),
        load_tokenizer(args.tokenizer),
        args.batch_size,
        add_bos_token=not args.no_bos,
    )
    scores = evaluate(
        lm,
        args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path,
    )
    scores["config"]["ckpt"] = str(args.ckpt)
    print(table(scores["results"], label=str(args.ckpt)))
    if args.json:
        atomic_write(args.json, json.dumps(scores, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

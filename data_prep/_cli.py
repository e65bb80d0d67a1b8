"""Shared bits of the data_prep scripts: one-line errors instead of tracebacks for bad input."""

import os
import sys

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(main) -> None:
    """Call main(); a user error (missing dir, empty input, bad option) exits 2 with one line."""
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def add_prep_arguments(parser) -> None:
    """The options both prepare_*.py scripts take."""
    from tinyrecipe.data.prep import BOUNDARIES

    parser.add_argument("--input", required=True)
    parser.add_argument(
        "--tokenizer", required=True, help="directory with tokenizer.json or tokenizer.model"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument("--boundary", choices=sorted(BOUNDARIES), default="bos_eos")
    parser.add_argument(
        "--chunk-tokens", type=int, default=2049 * 1024, help="tokens per litdata chunk"
    )


def prep_options(args) -> dict:
    return dict(num_workers=args.workers, boundary=args.boundary, chunk_tokens=args.chunk_tokens)

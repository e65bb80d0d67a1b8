"""Tokenize SlimPajama (without its GitHub subset) into litdata chunks.

    python data_prep/prepare_slimpajama.py --input data/sample/slimpajama \
        --tokenizer data/tokenizer --out data/prepared/slimpajama [--workers 2] [--boundary bos_eos]

Reads INPUT/{train,validation}/chunk*/*.jsonl.zst; writes OUT/{train,validation}.
"""

import argparse

from _cli import run

from tinyrecipe.data.prep import BOUNDARIES, prepare_slimpajama


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True)
    parser.add_argument(
        "--tokenizer", required=True, help="directory with tokenizer.json or tokenizer.model"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument("--boundary", choices=sorted(BOUNDARIES), default="bos_eos")
    parser.add_argument("--chunk-tokens", type=int, default=2049 * 1024)
    args = parser.parse_args()
    for summary in prepare_slimpajama(
        args.input,
        args.out,
        args.tokenizer,
        num_workers=args.workers,
        boundary=args.boundary,
        chunk_tokens=args.chunk_tokens,
    ):
        print(f"slimpajama {summary.line()}")


if __name__ == "__main__":
    run(main)

"""Tokenize Starcoderdata into litdata chunks, holding out a slice for validation.

    python data_prep/prepare_starcoder.py --input data/sample/starcoderdata \
        --tokenizer data/tokenizer --out data/prepared/starcoderdata [--languages python,java]

Reads INPUT/<language>/*.parquet (`content` column); writes OUT/{train,validation}.
"""

import argparse

from _cli import run

from tinyrecipe.data.prep import BOUNDARIES, prepare_starcoder


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
        "--languages", default=None, help="comma-separated subfolders (default: all)"
    )
    parser.add_argument("--val-permille", type=int, default=5, help="documents per 1000 held out")
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument("--boundary", choices=sorted(BOUNDARIES), default="bos_eos")
    parser.add_argument("--chunk-tokens", type=int, default=2049 * 1024)
    args = parser.parse_args()
    for summary in prepare_starcoder(
        args.input,
        args.out,
        args.tokenizer,
        languages=args.languages.split(",") if args.languages else None,
        val_permille=args.val_permille,
        num_workers=args.workers,
        boundary=args.boundary,
        chunk_tokens=args.chunk_tokens,
    ):
        print(f"starcoderdata {summary.line()}")


if __name__ == "__main__":
    run(main)

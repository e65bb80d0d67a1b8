"""Tokenize Starcoderdata into litdata chunks, holding out a slice for validation.

    python data_prep/prepare_starcoder.py --input data/sample/starcoderdata \
        --tokenizer data/tokenizer --out data/prepared/starcoderdata [--languages python,java]

Reads INPUT/<language>/*.parquet (`content` column); writes OUT/{train,validation}.
"""

import argparse

from _cli import add_prep_arguments, prep_options, run

from tinyrecipe.data.prep import prepare_starcoder


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_prep_arguments(parser)
    parser.add_argument(
        "--languages", default=None, help="comma-separated subfolders (default: all)"
    )
    parser.add_argument("--val-permille", type=int, default=5, help="documents per 1000 held out")
    args = parser.parse_args()
    languages = args.languages.split(",") if args.languages else None
    for summary in prepare_starcoder(
        args.input,
        args.out,
        args.tokenizer,
        languages=languages,
        val_permille=args.val_permille,
        **prep_options(args),
    ):
        print(f"starcoderdata {summary.line()}")


if __name__ == "__main__":
    run(main)

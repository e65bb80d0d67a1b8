"""Tokenize SlimPajama (without its GitHub subset) into litdata chunks.

    python data_prep/prepare_slimpajama.py --input data/sample/slimpajama \
        --tokenizer data/tokenizer --out data/prepared/slimpajama [--workers 2] [--boundary bos_eos]

Reads INPUT/{train,validation}/chunk*/*.jsonl.zst; writes OUT/{train,validation}.
"""

import argparse

from _cli import add_prep_arguments, prep_options, run

from tinyrecipe.data.prep import prepare_slimpajama


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_prep_arguments(parser)
    args = parser.parse_args()
    for summary in prepare_slimpajama(args.input, args.out, args.tokenizer, **prep_options(args)):
        print(f"slimpajama {summary.line()}")


if __name__ == "__main__":
    run(main)

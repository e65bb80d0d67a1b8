"""Write the offline sample corpus (the running Python's stdlib) in SlimPajama and Starcoderdata
formats:  python data_prep/make_sample.py --out data/sample [--max-mb 1]"""

import argparse

from _cli import run

from tinyrecipe.data.sample import make_sample


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--max-mb", type=float, default=None, help="cap per source (uncompressed MB)"
    )
    parser.add_argument("--files-per-split", type=int, default=2)
    args = parser.parse_args()
    make_sample(args.out, max_mb=args.max_mb, files_per_split=args.files_per_split)


if __name__ == "__main__":
    run(main)

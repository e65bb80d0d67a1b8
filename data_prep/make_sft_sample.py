"""Write an offline instruction-tuning sample (stdlib API questions answered by docstrings) as
JSON lines:  python data_prep/make_sft_sample.py --out data/sft/stdlib.jsonl [--max-records N]"""

import argparse

from _cli import run

from tinyrecipe.data.sample import make_sft_sample


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--max-records", type=int, default=None)
    args = parser.parse_args()
    make_sft_sample(args.out, args.max_records)


if __name__ == "__main__":
    run(main)

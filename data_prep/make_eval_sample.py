"""Build the offline multiple-choice task `stdlib_mc` from the sample corpus's held-out documents:
    python data_prep/make_eval_sample.py --raw data/quickstart/raw --out data/quickstart/eval
then `tinyrecipe eval ... --include-path data/quickstart/eval --tasks stdlib_mc`."""

import argparse

from _cli import run

from tinyrecipe.data.sample import make_eval_sample


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    parser.add_argument("--raw", required=True, help="the sample corpus (make_sample.py --out)")
    parser.add_argument("--out", required=True, help="directory for stdlib_mc.{jsonl,yaml}")
    parser.add_argument("--items", type=int, default=400, help="questions (half prose, half code)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-permille", type=int, default=50, help="as prepare_starcoder.py's")
    args = parser.parse_args()
    make_eval_sample(args.raw, args.out, args.items, args.seed, args.val_permille)


if __name__ == "__main__":
    run(main)

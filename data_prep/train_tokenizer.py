"""Train a Llama-style BPE tokenizer (byte fallback, <s> </s> <unk>) and save tokenizer.json.

    python data_prep/train_tokenizer.py --vocab-size 8192 --out data/tokenizer \
        data/sample/slimpajama/train data/sample/starcoderdata

Inputs are files or directories of *.jsonl.zst / *.jsonl (SlimPajama), *.parquet
(Starcoderdata) or *.txt; SlimPajama's GitHub records are left out as in prep.
"""

import argparse
from pathlib import Path

from _cli import run

from tinyrecipe.data.prep import iter_texts
from tinyrecipe.data.tokenizer import train_bpe_tokenizer

PATTERNS = ("*.jsonl.zst", "*.jsonl", "*.parquet", "*.txt")


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="files or directories")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="directory for tokenizer.json")
    args = parser.parse_args()
    files = []
    for item in map(Path, args.inputs):
        if item.is_dir():
            files += sorted(p for pattern in PATTERNS for p in item.rglob(pattern))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"tokenizer input '{item}' does not exist")
    if not files:
        raise ValueError(f"no {', '.join(PATTERNS)} files under {', '.join(args.inputs)}")
    path = train_bpe_tokenizer(iter_texts(files), args.vocab_size, args.out)
    print(f"trained a {args.vocab_size}-token BPE on {len(files)} files -> {path}")


if __name__ == "__main__":
    run(main)

"""`tinyrecipe convert`: Hugging Face Llama directories <-> tinyrecipe checkpoints
(`tinyrecipe.interop.convert`)."""

from __future__ import annotations

import argparse

from tinyrecipe.interop.convert import from_hf, to_hf, to_peft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe convert", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", allow_abbrev=False, help="checkpoint -> Hugging Face directory")
    to.add_argument("ckpt")
    to.add_argument("out_dir")
    to.add_argument(
        "--tokenizer", help="directory with tokenizer.json / tokenizer.model to include"
    )
    to.add_argument("--max-shard-gb", type=float, default=5.0)
    peft = sub.add_parser(
        "to-peft", allow_abbrev=False, help="a LoRA run's adapters -> PEFT adapter directory"
    )
    peft.add_argument("ckpt")
    peft.add_argument("out_dir")
    peft.add_argument("--base", help="the base model's Hugging Face name or directory")
    frm = sub.add_parser("from-hf", allow_abbrev=False, help="Hugging Face directory -> checkpoint")
    frm.add_argument("hf_dir")
    frm.add_argument("out")
    args = parser.parse_args(argv)
    if args.direction == "to-hf":
        print(f"wrote {to_hf(args.ckpt, args.out_dir, args.tokenizer, args.max_shard_gb)}")
    elif args.direction == "to-peft":
        print(f"wrote {to_peft(args.ckpt, args.out_dir, args.base)}")
    else:
        print(f"wrote {from_hf(args.hf_dir, args.out)}")
    return 0

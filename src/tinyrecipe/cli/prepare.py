"""`tinyrecipe prepare INPUT... --tokenizer DIR --out DIR [options]`: tokenize a corpus in any
common format into litdata splits `OUT/{train,validation}` (`tinyrecipe.data.prep`).

    tinyrecipe prepare data/raw/*.jsonl.gz --tokenizer TOK --out data/prepared/mine
    tinyrecipe prepare books/ --separator '\\n\\n\\n' --min-chars 200 --tokenizer TOK --out OUT
    tinyrecipe prepare SLIMPAJAMA_ROOT --preset slimpajama --tokenizer TOK --out OUT

Across machines: `--shard I/N` prepares the I-th of N parts into OUT/parts/I-of-N (one job of an
array each; `--slurm N` writes the sbatch scripts), then `tinyrecipe prepare merge
OUT/parts/* --out OUT` makes the splits, byte-identical to a one-shot preparation.
"""

from __future__ import annotations

import argparse
import codecs
import shlex
import sys
from pathlib import Path

from tinyrecipe.io import atomic_write


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["merge"]:
        return merge(argv[1:])
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="tinyrecipe prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="files, directories or glob patterns")
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="a directory with tokenizer.json (a Hugging Face model's) or tokenizer.model",
    )
    parser.add_argument("--out", required=True, help="writes OUT/train and OUT/validation")
    parser.add_argument(
        "--preset",
        choices=["slimpajama", "starcoder"],
        help="TinyLlama's corpora: INPUT is the SlimPajama or Starcoderdata root",
    )
    parser.add_argument("--languages", help="starcoder preset: comma-separated subfolders")
    parser.add_argument(
        "--text-field", default="text", help="field or column of the text (a.b for nested)"
    )
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="skip records whose field has this value (repeatable)",
    )
    parser.add_argument("--min-chars", type=int, default=0, help="skip shorter documents")
    parser.add_argument(
        "--separator", help="split .txt/.md files into documents on this string (\\n escapes)"
    )
    parser.add_argument(
        "--validation", nargs="+", help="inputs of the validation split (default: a hash share)"
    )
    parser.add_argument(
        "--val-permille",
        type=float,
        default=None,
        help="documents per 1000 held out by content hash (default 5; 0: train only)",
    )
    from tinyrecipe.data.prep import BOUNDARIES, CHUNK_TOKENS

    parser.add_argument("--boundary", choices=sorted(BOUNDARIES), default="bos_eos")
    parser.add_argument(
        "--chunk-tokens", type=int, default=CHUNK_TOKENS, help="tokens per litdata chunk"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument("--shard", help="I/N: prepare the I-th (0-based) of N parts")
    parser.add_argument(
        "--slurm", type=int, metavar="N", help="write sbatch scripts for an N-part array job"
    )
    args = parser.parse_args(argv)
    if args.slurm:
        return write_slurm(argv, args)

    from tinyrecipe.data.prep import PRESETS, prepare_corpus
    from tinyrecipe.data.readers import RecordFormat

    options = dict(
        num_workers=args.workers,
        boundary=args.boundary,
        chunk_tokens=args.chunk_tokens,
        shard=parse_shard(args.shard),
    )
    if args.preset:
        given = [o for o in ("text_field", "drop", "separator", "validation") if _set(args, o)]
        given += ["min_chars"] if args.min_chars else []
        if args.preset == "slimpajama" and args.val_permille is not None:
            given.append("val_permille")  # its own validation split
        if given or len(args.inputs) != 1 or (args.languages and args.preset != "starcoder"):
            raise ValueError(
                f"--preset {args.preset} takes one INPUT (the corpus root) and sets the record "
                f"format itself; drop {', '.join('--' + g.replace('_', '-') for g in given) or 'the extra inputs'}"
            )
        if args.preset == "starcoder":
            options["languages"] = args.languages.split(",") if args.languages else None
            options["val_permille"] = 5 if args.val_permille is None else args.val_permille
        summaries = PRESETS[args.preset](args.inputs[0], args.out, args.tokenizer, **options)
    else:
        fmt = RecordFormat(
            text_field=args.text_field,
            drop=tuple(parse_drop(d) for d in args.drop),
            min_chars=args.min_chars,
            separator=parse_separator(args.separator) if args.separator else None,
        )
        summaries = prepare_corpus(
            args.inputs,
            args.out,
            args.tokenizer,
            fmt,
            validation=args.validation,
            val_permille=5 if args.val_permille is None else args.val_permille,
            **options,
        )
    where = args.out if not args.shard else f"{args.out} part {args.shard}"
    for summary in summaries:
        print(f"{where} {summary.line()}")
    return 0


def parse_separator(text: str) -> str:
    """`--separator` with its backslash escapes read (\\n, \\t, \\u2014) and any other
    character kept as it is ("§§", "—")."""
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def _set(args, name: str) -> bool:
    return getattr(args, name) not in (None, [], "text")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise ValueError(f"shard {value!r} is not I/N (e.g. --shard 0/8)") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {value} is out of range: in --shard I/N, I is 0..N-1")
    return index, count


def parse_drop(value: str) -> tuple[str, str]:
    field, sep, wanted = value.partition("=")
    if not sep or not field:
        raise ValueError(f"drop {value!r} is not FIELD=VALUE (e.g. --drop meta.source=github)")
    return field, wanted


def write_slurm(argv: list[str], args) -> int:
    """OUT/prepare.sbatch (an N-task array, task I runs `--shard I/N`) and OUT/prepare-merge.sbatch."""
    if args.shard:
        raise ValueError("--slurm writes the --shard of each task itself; drop --shard")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rest, skip = [], False
    for a in argv:  # the same command, less --slurm N
        if skip:
            skip = False
        elif a == "--slurm":
            skip = True
        elif not a.startswith("--slurm="):
            rest.append(a)
    python = [sys.executable, "-m", "tinyrecipe.cli", "prepare"]
    n = args.slurm
    head = [
        "#!/bin/bash",
        "#SBATCH --job-name=tinyrecipe-prepare",
        "# add: #SBATCH --partition=... --cpus-per-task=... --time=... (your cluster's)",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}  # where the command was given: its relative paths",
    ]
    array = [
        *head[:2],
        f"#SBATCH --array=0-{n - 1}",
        f"#SBATCH --output={out}/slurm-prepare-%A_%a.out",
        *head[2:],
        f'srun {shlex.join(python + rest)} --shard "${{SLURM_ARRAY_TASK_ID}}/{n}"',
    ]
    parts = " ".join(shlex.quote(str(out / "parts" / f"{i}-of-{n}")) for i in range(n))
    merge_lines = [
        *head[:2],
        f"#SBATCH --output={out}/slurm-merge-%j.out",
        *head[2:],
        f"srun {shlex.join(python)} merge {parts} --out {shlex.quote(str(out))}",
    ]
    atomic_write(out / "prepare.sbatch", "\n".join(array) + "\n")
    atomic_write(out / "prepare-merge.sbatch", "\n".join(merge_lines) + "\n")
    print(
        f"wrote {out}/prepare.sbatch ({n} array tasks) and {out}/prepare-merge.sbatch; add your "
        f"#SBATCH lines, then: job=$(sbatch --parsable {out}/prepare.sbatch) && "
        f"sbatch --dependency=afterok:$job {out}/prepare-merge.sbatch"
    )
    return 0


def merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="tinyrecipe prepare merge",
        description="One split per split name from the parts of a `--shard I/N` preparation "
        "(every part present and prepared alike, or nothing is written).",
    )
    parser.add_argument("parts", nargs="+", help="the parts' directories (OUT/parts/*)")
    parser.add_argument("--out", required=True, help="writes OUT/train and OUT/validation")
    parser.add_argument("--remove-parts", action="store_true", help="delete the parts once merged")
    args = parser.parse_args(argv)
    from tinyrecipe.data.prep import merge_parts

    for summary in merge_parts(args.parts, args.out, remove_parts=args.remove_parts):
        print(f"{args.out} {summary.line()}")
    return 0

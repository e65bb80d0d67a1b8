"""The `tinyrecipe` command: one entry point, one error wrapper. Each subcommand's module is
imported only when it runs (so `tinyrecipe plan` does not pay for Lightning)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# subcommand -> (module with a `main(argv)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": (
        "tinyrecipe.cli.prepare",
        "tokenize a corpus (jsonl, json, parquet, arrow, txt; local or sharded) into litdata",
    ),
    "fit": ("tinyrecipe.cli.fit", "train a recipe: tinyrecipe fit --config recipes/X.yaml"),
    "validate": ("tinyrecipe.cli.fit", "evaluate a recipe's model on its validation data"),
    "fabric": (
        "tinyrecipe.cli.fit",
        "train a recipe with the plain Lightning Fabric loop (same model, data, step)",
    ),
    "status": (
        "tinyrecipe.cli.status",
        "where a run stands: step, loss, tokens/s, ETA, restarts, goodput (its journal)",
    ),
    "generate": ("tinyrecipe.cli.generate", "sample text from a checkpoint"),
    "eval": ("tinyrecipe.cli.eval", "score a checkpoint on lm-evaluation-harness tasks"),
    "convert": (
        "tinyrecipe.cli.convert",
        "Hugging Face Llama <-> tinyrecipe checkpoint; LoRA adapters -> PEFT (to-hf / from-hf / to-peft)",
    ),
    "memory": (
        "tinyrecipe.cli.memory",
        "training memory per device for a recipe (parameters, grads, AdamW, activations)",
    ),
    "plan": (
        "tinyrecipe.cli.plan",
        "inference-aware model size and training length for a target loss",
    ),
    "sweep": (
        "tinyrecipe.cli.sweep",
        "run overlays of a base recipe (and seeds), each in its own run directory",
    ),
    "compare": (
        "tinyrecipe.cli.compare",
        "table, plots and a report of runs against each other",
    ),
    "ladder": ("tinyrecipe.cli.ladder", "write a ladder of model sizes x token budgets"),
    "fit-law": (
        "tinyrecipe.cli.fit_law",
        "fit L(N, D) = E + A/N^a + B/D^b to your runs (plan --law uses it)",
    ),
    "smoke": (
        "tinyrecipe.cli.smoke",
        "train the tiny decoder briefly on stdlib text (checks an install)",
    ),
}

# What a user can cause (a bad path, key or value, a damaged file, a full disk, a diverged run):
# one line on stderr and exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    OSError,
    FloatingPointError,
    argparse.ArgumentError,  # a recipe key or value the parser refuses
)


SPECIFIC = re.compile(
    r"not accepted|not expected|does not exist|unrecognized|Expected a <class '(?!NoneType)"
)


def fail(command: str, err: BaseException | str) -> int:
    """Print `tinyrecipe <command>: error: <err>` on stderr, as one line; the exit status of a
    user error."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else repr(err)
    if isinstance(err, argparse.ArgumentError):
        # jsonargparse explains a refused value over many lines; keep the one that names it
        reason = next((line for line in lines[1:] if SPECIFIC.search(line)), None)
        given = next((line[13:] for line in lines if line.startswith("Given value: ")), None)
        if reason is None and given is not None:
            reason = f"cannot use the value {given}"
            if re.search(r"[{,]\s*[\w.]+:[^\s/]", given):  # {a:1}: one YAML key "a:1"
                reason += " (a YAML mapping needs a space after each colon: {key: value})"
        message = f"{message.rstrip(':')}: {reason}" if reason else message
        message += f" (tinyrecipe {command} --help lists the options)"
    else:
        message = " ".join(lines)
    print(f"tinyrecipe {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Dispatch `tinyrecipe <command> ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: tinyrecipe <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ntinyrecipe: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command = argv[0]
    module = importlib.import_module(COMMANDS[command][0])
    # The recipe commands parse their subcommand themselves (LightningCLI's form).
    args = argv if module.__name__ == "tinyrecipe.cli.fit" else argv[1:]
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    try:
        return module.main(args) or 0
    except BrokenPipeError:  # the reader went away (`tinyrecipe status RUN | head -3`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except USER_ERRORS as err:
        if os.environ.get("TINYRECIPE_DEBUG"):
            raise
        return fail(command, err)

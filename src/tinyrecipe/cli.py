"""The `tinyrecipe` command. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a `main(argv)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "smoke": (
        "tinyrecipe.smoke",
        "train the tiny decoder briefly on stdlib text (checks an install)",
    ),
    "fit": ("tinyrecipe.lightning_cli", "train a recipe: tinyrecipe fit --config recipes/X.yaml"),
    "validate": ("tinyrecipe.lightning_cli", "evaluate a recipe's model on its validation data"),
    "test": ("tinyrecipe.lightning_cli", "run the test loop of a recipe"),
    "fabric": (
        "tinyrecipe.fabric",
        "train a recipe with the plain Lightning Fabric loop (same model, data, optimizer)",
    ),
    "generate": ("tinyrecipe.generate", "sample text from a checkpoint"),
    "convert": (
        "tinyrecipe.convert",
        "Hugging Face Llama <-> tinyrecipe checkpoint (to-hf / from-hf)",
    ),
    "memory": (
        "tinyrecipe.memory",
        "training memory per device for a recipe (parameters, grads, AdamW, activations)",
    ),
    "plan": (
        "tinyrecipe.plan",
        "inference-aware model size and training length for a target loss",
    ),
}


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
    module, _ = COMMANDS[argv[0]]
    args = (
        argv if module == "tinyrecipe.lightning_cli" else argv[1:]
    )  # LightningCLI wants its subcommand
    return importlib.import_module(module).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())

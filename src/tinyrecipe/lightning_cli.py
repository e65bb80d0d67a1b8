"""`tinyrecipe fit | validate | test --config recipes/X.yaml`: LightningCLI over our module and
DataModule. Several --config files compose (base recipe, then an ablation overlay); dotted
overrides (`--trainer.max_steps 50`) and `--print_config` work as in any LightningCLI."""

from __future__ import annotations

import logging
import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from tinyrecipe.model import ModelConfig
from tinyrecipe.modules import CausalLMModule
from tinyrecipe.recipe import DEFAULT_DATA


def _model_vocab(preset: str, config: dict | None) -> int:
    return ModelConfig.from_name(preset, **(config or {})).vocab_size


class TinyRecipeCLI(LightningCLI):
    """`data:` is any LightningDataModule (`class_path:` + `init_args:`); without a class_path
    it is the pretraining `MixedStreamingDataModule`, so plain `data: {sources: ...}` works."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
        # The data must match the model's vocabulary: one source of truth, the model's config.
        parser.link_arguments(
            ("model.preset", "model.config"), "data.init_args.vocab_size", compute_fn=_model_vocab
        )


def _show_tinyrecipe_info() -> None:
    """Print tinyrecipe's INFO lines (which attention kernel runs, ...): never a silent slow path."""
    log = logging.getLogger("tinyrecipe")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str]) -> int:
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    _show_tinyrecipe_info()
    try:
        TinyRecipeCLI(
            CausalLMModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            args=None
            if argv == sys.argv[1:]
            else argv,  # from the console LightningCLI reads sys.argv
            save_config_kwargs={"overwrite": True},
        )
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as err:
        # A recipe error (unknown preset, data/model mismatch, missing data dir...): one line,
        # no traceback. TINYRECIPE_DEBUG=1 shows the traceback.
        if os.environ.get("TINYRECIPE_DEBUG"):
            raise
        print(f"tinyrecipe {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        return 2
    return 0

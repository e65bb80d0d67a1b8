"""`tinyrecipe fit | validate | fabric --config recipes/X.yaml`: one recipe parser (LightningCLI over
`CausalLMModule` and a DataModule) for the Trainer and the Fabric loop.

Several --config files compose key by key (a base recipe, then an ablation overlay that states
only what it changes, `model.config` included); dotted overrides (`--trainer.max_steps 50`) and
`--print_config` work as in any LightningCLI. What every run needs is a default, so a recipe
states only what differs:

* `trainer.default_root_dir` is the one output directory: TensorBoard logs in `<root>/tensorboard`
  (one version per directory, a resume continues it) and checkpoints in `<root>/checkpoints`;
* `checkpoint:` configures the always-present checkpoint callback (`Checkpoints`: every
  `every_n_train_steps`, the newest `save_top_k` kept, `last.ckpt` a link to the newest);
* `throughput:` the tokens/s and MFU monitor; the learning rate is logged every step;
* `downstream_eval:` lm-evaluation-harness tasks scored during training (off without `tasks`);
* `global_batch_size:` (sequences per optimizer step) derives `trainer.accumulate_grad_batches`
  from the world size and `data.batch_size`;
* `auto_precision: true` picks the precision for the device found (bf16-mixed on a GPU and on
  a CPU with AMX-BF16, else fp32);
* `trainer.strategy: fsdp2` is `tinyrecipe.train.strategy.FSDP2Strategy`; checkpoint files are
  written atomically (`AtomicCheckpointIO`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import tinyrecipe.train.strategy  # noqa: F401  (registers trainer.strategy: fsdp2)
from tinyrecipe.checkpoint import check_fit_start, resolve_auto_resume
from tinyrecipe.model.config import resolve_config
from tinyrecipe.train.callbacks import (
    Checkpoints,
    DownstreamEval,
    HangWatchdog,
    RunJournal,
    SlurmRequeue,
    StepLearningRateMonitor,
    TokenThroughputMonitor,
)
from tinyrecipe.train.elastic import init_process_group
from tinyrecipe.train.module import CausalLMModule
from tinyrecipe.train.settings import moved_key

DEFAULT_DATA = "tinyrecipe.data.datamodule.MixedStreamingDataModule"
# A bad recipe raises (the `tinyrecipe` wrapper prints one line) instead of a usage dump; an
# abbreviated option (`--model.warmup`) is refused like a misspelt one.
PARSER_KWARGS = {"exit_on_error": False, "allow_abbrev": False}  # options spelt out


def _model_vocab(preset: str, config) -> int | None:
    config = getattr(config, "init_args", config)  # jsonargparse's Namespace of ModelOverrides
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    try:
        return resolve_config(preset, config).vocab_size
    except (ValueError, TypeError):
        return None  # the module refuses the preset itself, in one line


def world_size(devices: Any, num_nodes: int, accelerator: str | None) -> int:
    """Processes a Trainer with these settings runs (devices 'auto'/-1 counted like Lightning)."""
    if isinstance(devices, list):
        n = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    else:  # "auto" or -1: every visible GPU, else one CPU process
        import torch

        cuda = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if cuda else 1
    return n * (num_nodes or 1)


def check_accelerator(accelerator: str | None) -> None:
    """A GPU recipe on a machine without one: one line naming the key and what to do (Lightning
    says "No supported gpu backend found!" from deep in the Trainer or Fabric)."""
    import torch

    if accelerator not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return
    raise ValueError(
        f"trainer.accelerator is {accelerator!r} but torch finds no GPU on this machine "
        "(torch.cuda.is_available() is False); run the recipe on a GPU machine, or here with "
        "--trainer.accelerator cpu and a CPU-sized recipe such as recipes/quickstart.yaml"
    )


def device_precision(accelerator: str | None) -> str:
    """bf16-mixed on a GPU that computes bf16 and on a CPU with AMX-BF16 (Intel Sapphire Rapids
    and later: 390 against 210 GFLOP/s at 1024^3 on 2 cores, 1.33x fp32's tokens/s in
    `benchmarks/bench_train.py`), else 32-true (without AMX, oneDNN's bf16 has been ~25x slower
    than fp32, on AMD Zen 3); says which and why."""
    import torch

    from tinyrecipe.planning.flops import cpu_info, cpu_summary

    if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
        fast = torch.cuda.is_bf16_supported()
        where, why = torch.cuda.get_device_name(), "bf16 tensor cores" if fast else "no bf16"
    else:
        fast = "amx_bf16" in cpu_info()[1]
        where = f"the CPU ({cpu_summary()})"
        why = "AMX-BF16: bf16 matmuls beat fp32" if fast else "no AMX-BF16: fp32 is faster"
    precision = "bf16-mixed" if fast else "32-true"
    logging.getLogger("tinyrecipe").info(
        f"tinyrecipe: auto_precision: {precision} on {where}; {why}"
    )
    return precision


def accumulation(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per optimizer step for `global_batch` sequences; refused unless exact."""
    per_pass = micro_batch * world
    if global_batch <= 0 or global_batch % per_pass:
        raise ValueError(
            f"global_batch_size {global_batch} is not a multiple of data.batch_size {micro_batch} "
            f"x {world} process(es) = {per_pass}; change one of them"
        )
    return global_batch // per_pass


class TinyRecipeCLI(LightningCLI):
    """LightningCLI over `CausalLMModule` and any LightningDataModule (`data:` names a
    `class_path`; without one it is the pretraining `MixedStreamingDataModule`, so plain
    `data: {sources: ...}` works). A bad recipe raises instead of printing usage (the `tinyrecipe`
    wrapper prints one line); the module builds its own optimizer, so LightningCLI's
    `--optimizer` / `--lr_scheduler` are not offered."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_kwargs", PARSER_KWARGS)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(CausalLMModule, L.LightningDataModule, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict):
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            # run=False (the Fabric loop's parser, tests' helpers): `fit`'s own argument, which
            # recipes may set (`ckpt_path: auto`), accepted and left to the caller
            self.parser.add_argument(
                "--ckpt_path", type=str | None, default=None, help=argparse.SUPPRESS
            )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoints, "checkpoint")
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        parser.add_lightning_class_args(StepLearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(DownstreamEval, "downstream_eval")
        parser.add_lightning_class_args(RunJournal, "journal")
        parser.add_lightning_class_args(HangWatchdog, "watchdog")
        parser.add_lightning_class_args(SlurmRequeue, "slurm_requeue")
        parser.add_argument(
            "--auto_precision",
            type=bool,
            default=False,
            help="precision for the device found: bf16-mixed on a GPU with bf16 or a CPU with "
            "AMX-BF16, else 32-true",
        )
        parser.add_argument(
            "--global_batch_size",
            type=int | None,
            default=None,
            help="sequences per optimizer step; sets trainer.accumulate_grad_batches",
        )
        parser.set_defaults(
            {
                "data": {"class_path": DEFAULT_DATA},
                "lr_monitor.logging_interval": "step",
                "trainer.check_val_every_n_epoch": None,  # training streams are endless
                "trainer.enable_model_summary": False,  # the run prints its own line (describe)
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "", "name": "tensorboard", "version": ""},
                },
                "trainer.plugins": [{"class_path": "tinyrecipe.checkpoint.AtomicCheckpointIO"}],
            }
        )
        # The data must match the model's vocabulary: one source of truth, the model's config.
        parser.link_arguments(
            ("model.preset", "model.config"), "data.init_args.vocab_size", compute_fn=_model_vocab
        )

    def before_instantiate_classes(self) -> None:
        resolve_recipe(self.config[self.subcommand] if self.subcommand else self.config)
        if self.subcommand == "validate":
            # Lightning's table repeats every metric under each DataLoader; ours below does not
            self.config["validate"]["verbose"] = False

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_accelerator(config.trainer.accelerator)  # before the model and data are built
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        """The Trainer with the CLI's callbacks, less those a recipe's settings rule out: without
        a logger (`trainer.logger: false`) the learning-rate monitor, which needs one."""
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.logger is None:
            trainer.callbacks[:] = [
                c for c in trainer.callbacks if not isinstance(c, StepLearningRateMonitor)
            ]
        return trainer

    def _resolve_auto(self) -> dict:
        """`ckpt_path: auto` made the run directory's newest readable checkpoint, or None."""
        kwargs = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if kwargs.get("ckpt_path") == "auto":
            callback = self.trainer.checkpoint_callback
            directory = Path(callback.dirpath) if callback and callback.dirpath else None
            kwargs["ckpt_path"] = resolve_auto_resume(directory)
            said = f"resuming from {kwargs['ckpt_path']}" if kwargs["ckpt_path"] else "a new run"
            rank_zero_info(f"tinyrecipe: --ckpt_path auto: {said}")
        return kwargs

    def before_fit(self) -> None:
        init_process_group(self.trainer.strategy)  # restart-safe under torchrun
        asked = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get(
            "ckpt_path"
        )
        kwargs = self._resolve_auto()
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunJournal):
                dump = self.parser.dump(self.config, skip_none=False, skip_check=True)
                callback.recipe_sha256 = hashlib.sha256(dump.encode()).hexdigest()[:16]
                if asked == "auto":
                    callback.why = "auto" if kwargs.get("ckpt_path") else "fresh"
        # every refusal before the Trainer writes logs, the recipe's copy or a validation point
        check_fit_start(self.trainer, self.model, kwargs.get("ckpt_path"))

    def before_validate(self) -> None:
        init_process_group(self.trainer.strategy)
        self._resolve_auto()

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in sorted(self.trainer.callback_metrics.items())}
            width = max(map(len, metrics), default=0)
            print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()))


def resolve_recipe(cfg) -> None:
    """The settings derived from others, in place on a parsed recipe: the output directory's
    logger path, no checkpoint saved under `trainer.enable_checkpointing: false`, and the
    accumulation of global_batch_size."""
    trainer = cfg.trainer
    root = trainer.default_root_dir or "out"
    trainer.default_root_dir = root
    logger = trainer.logger
    if hasattr(logger, "init_args") and getattr(logger.init_args, "save_dir", None) == "":
        logger.init_args.save_dir = root
    if trainer.enable_checkpointing is False and cfg.get("checkpoint") is not None:
        # the CLI's checkpoint callback stays (a Trainer without checkpointing refuses one),
        # saving nothing
        trainer.enable_checkpointing = True
        cfg.checkpoint.save_top_k, cfg.checkpoint.save_last = 0, False
        cfg.checkpoint.every_n_train_steps = 0
    if cfg.get("checkpoint") is not None and not cfg.checkpoint.dirpath:
        # set before the Trainer starts: `--ckpt_path last` is looked up in it at once
        cfg.checkpoint.dirpath = str(Path(root) / "checkpoints")
    bars = [c for c in trainer.callbacks or [] if "ProgressBar" in getattr(c, "class_path", "")]
    if trainer.enable_progress_bar is not False and not bars:
        from jsonargparse import Namespace

        bar = Namespace(
            class_path="tinyrecipe.train.callbacks.StepProgressBar", init_args=Namespace()
        )
        trainer.callbacks = [*(trainer.callbacks or []), bar]
    if cfg.get("auto_precision"):
        trainer.precision = device_precision(trainer.accelerator)
    if cfg.get("global_batch_size"):
        world = world_size(trainer.devices, trainer.num_nodes, trainer.accelerator)
        trainer.accumulate_grad_batches = accumulation(
            cfg.global_batch_size, cfg.data.init_args.batch_size, world
        )


class _ParseOnly(TinyRecipeCLI):
    """The recipe parsed and resolved, nothing instantiated (the Fabric loop builds its own)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--resume", type=str | None, default=None, help="a Fabric checkpoint")

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass  # the Fabric loop seeds itself


def expand_strategy_name(argv: list[str]) -> list[str]:
    """`--trainer.strategy fsdp2` followed by `--trainer.strategy.<option>`: the parser knows the
    options of a class, not of a registered name, so the name becomes the class path."""
    if not any(a.startswith("--trainer.strategy.") for a in argv):
        return argv
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--trainer.strategy" and out[i + 1] == "fsdp2":
            out[i + 1] = "tinyrecipe.train.strategy.FSDP2Strategy"
    return out


def parse_recipe(argv: list[str]) -> tuple[dict, str | None]:
    """(the recipe as a plain dict, --resume) from `--config ... --a.b value ...` arguments,
    validated and merged exactly as `tinyrecipe fit` does."""
    with warnings.catch_warnings():  # "args= and sys.argv both given": on purpose here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ParseOnly(run=False, args=expand_strategy_name(argv), save_config_callback=None)
    resume = cli.config.pop("resume", None)
    cli.config.pop("ckpt_path", None)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)), resume


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a notebook or a test may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def _show_tinyrecipe_info() -> None:
    """Print tinyrecipe's INFO lines (which attention kernel runs, ...): never a silent slow path.
    Lightning's advertisement for its cloud logger (an INFO line of every run) is left out."""
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_a_tip not in lightning_info.filters:
        lightning_info.addFilter(_not_a_tip)
    log = logging.getLogger("tinyrecipe")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def check_recipe_files(argv: list[str]) -> None:
    """A `--config` file that is not valid YAML, or a recipe key of the former flat `model:`
    layout (`model.lr`, in a file or as `--model.lr`): one line naming the file and line, or the
    key and its place now (the parser's own messages name neither)."""
    for flag, path in zip(argv, argv[1:], strict=False):
        if flag not in ("--config", "-c") or not Path(path).is_file():
            continue
        try:
            recipe = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"recipe '{path}'{where} is not valid YAML ({problem}); fix it there"
            ) from None
        model = recipe.get("model") if isinstance(recipe, dict) else None
        for key, value in (model or {}).items() if isinstance(model, dict) else ():
            if (new := moved_key(key, value)) is not None:
                raise ValueError(f"recipe '{path}': model.{key} is now model.{new}; move it there")
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key.startswith("--model.") and key.count(".") == 1:
            value = value or (argv[i + 1] if i + 1 < len(argv) else None)
            if (new := moved_key(key[len("--model.") :], value)) is not None:
                raise ValueError(f"option {key} is now --model.{new}")


def main(argv: list[str]) -> int:
    """`argv` starts with the subcommand: fit, validate or fabric."""
    _show_tinyrecipe_info()
    check_recipe_files(argv)
    try:
        if argv[:1] == ["fabric"]:
            from tinyrecipe.train.fabric import train

            recipe, resume = parse_recipe(argv[1:])
            check_accelerator(recipe["trainer"].get("accelerator"))
            train(recipe, resume=resume)
            return 0
        args = expand_strategy_name(argv)
        with warnings.catch_warnings():  # "args= and sys.argv both given": rewritten on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            TinyRecipeCLI(
                # from the console LightningCLI reads sys.argv itself
                args=None if args == sys.argv[1:] else args,
                save_config_kwargs={"overwrite": True},
            )
    except MisconfigurationException as err:
        # Lightning's word for settings it refuses (devices this machine lacks, ...): a user
        # error, said in one line by the `tinyrecipe` wrapper
        raise ValueError(f"Lightning refuses the recipe's settings: {err}") from err
    return 0


os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

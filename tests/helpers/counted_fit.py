"""`tinyrecipe fit` with every torch.distributed collective counted per optimizer step.

    python tests/helpers/counted_fit.py OUT fit-arguments...

Every rank writes OUT.rank<r>: a JSON list with, per optimizer step, the collectives called
during it ({name: calls}). Launched ranks re-run this script, so all of them are counted."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "barrier",
    "reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "scatter",
    "all_to_all_single",
)
counts: dict[str, int] = {}


def counted(name, fn):
    def call(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return fn(*args, **kwargs)

    return call


for _name in COLLECTIVES:
    if hasattr(dist, _name):
        setattr(dist, _name, counted(_name, getattr(dist, _name)))

import lightning as L  # noqa: E402

from tinyrecipe.cli.fit import TinyRecipeCLI  # noqa: E402


class PerStep(L.Callback):
    def __init__(self, out: str) -> None:
        self.out, self.steps, self.last = out, [], {}

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        now = dict(counts)
        self.steps.append(
            {k: v - self.last.get(k, 0) for k, v in now.items() if v != self.last.get(k, 0)}
        )
        self.last = now

    def on_train_end(self, trainer, *_) -> None:
        Path(f"{self.out}.rank{trainer.global_rank}").write_text(json.dumps(self.steps))


if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    ckpt_path = None
    if "--ckpt_path" in args:  # fit's own argument (this parser has no subcommands)
        i = args.index("--ckpt_path")
        ckpt_path, args = args[i + 1], args[:i] + args[i + 2 :]
    cli = TinyRecipeCLI(
        run=False,
        args=args,
        save_config_callback=None,
    )
    cli.trainer.callbacks.insert(0, PerStep(out))
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)

"""`tinyrecipe fit` with every torch.distributed collective and every host read of a tensor
counted per optimizer step.

    python tests/helpers/counted_fit.py OUT fit-arguments...

Every rank writes OUT.rank<r>: a JSON list with, per optimizer step, the collectives called
during it ({name: calls}), and OUT.reads.rank<r>: per optimizer step, whether it was a logging
step and where tensors were read on the host (`.item()`, `float()`, `int()`, `bool()`,
`.tolist()`, `.cpu()`: each a device sync on a GPU), as "file:line" of the nearest frame in
tinyrecipe or Lightning. A tensor flagged `_host_copy` (a copy made to be read later) is not
counted. Launched ranks re-run this script, so all of them are counted."""

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

import sys as _sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

reads: list[str] = []


def _where() -> str:
    for frame in reversed(traceback.extract_stack(_sys._getframe(2), limit=25)):
        if "/tinyrecipe/" in frame.filename or "/lightning/" in frame.filename:
            name = frame.filename.split("/site-packages/")[-1].split("/src/")[-1]
            return f"{name}:{frame.lineno}"
    return "?"


def read_counted(fn):
    def call(self, *args, **kwargs):
        if counting and not getattr(self, "_host_copy", False):
            reads.append(_where())
        return fn(self, *args, **kwargs)

    return call


counting = False
for _name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
    setattr(torch.Tensor, _name, read_counted(getattr(torch.Tensor, _name)))

import lightning as L  # noqa: E402

from tinyrecipe.cli.fit import TinyRecipeCLI  # noqa: E402


class PerStep(L.Callback):
    def __init__(self, out: str) -> None:
        self.out, self.steps, self.last = out, [], {}
        self.reads: list[dict] = []
        self.closed = 0  # optimizer steps whose reads are recorded

    def on_train_batch_start(self, trainer, *_) -> None:
        global counting
        if trainer.global_step > self.closed:
            self._close_step(trainer)
        counting = True

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        now = dict(counts)
        self.steps.append(
            {k: v - self.last.get(k, 0) for k, v in now.items() if v != self.last.get(k, 0)}
        )
        self.last = now

    def _close_step(self, trainer) -> None:
        """The reads since the last close, charged to the step just finished (its logging runs
        after on_train_batch_end, before the next step's first batch)."""
        step = trainer.global_step
        self.reads.append(
            {"step": step, "logging": step % trainer.log_every_n_steps == 0, "reads": list(reads)}
        )
        reads.clear()
        self.closed = step

    def on_train_end(self, trainer, *_) -> None:
        global counting
        if trainer.global_step > self.closed:
            self._close_step(trainer)
        counting = False
        rank = trainer.global_rank
        Path(f"{self.out}.rank{rank}").write_text(json.dumps(self.steps))
        Path(f"{self.out}.reads.rank{rank}").write_text(json.dumps(self.reads))


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

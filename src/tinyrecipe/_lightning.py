"""Lightning's private members that tinyrecipe uses, all in this one module, each with what it is
for and why no public API serves. `tests/test_lightning_private.py` checks every one against the
installed Lightning, so an upgrade that moves one fails there, not in a run. `docs/design.md`
lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The file of a sharded (distributed) checkpoint directory in which Lightning keeps everything
# but the model and optimizer shards (lightning.fabric.utilities.load._METADATA_FILENAME).
SHARDED_METADATA_FILE = "meta.pt"


def attached_trainer(module):
    """The Trainer a LightningModule is attached to, None when it is used alone (a notebook, a
    test): `module.trainer` raises then, and no public attribute tells."""
    return module._trainer


def should_accumulate(trainer) -> bool:
    """Whether the micro-batch that just ran does not end an optimizer step. No public property
    says it; Lightning's own `ThroughputMonitor` asks the fit loop the same question."""
    return trainer.fit_loop._should_accumulate()


def steps_logged_at(trainer) -> int:
    """The optimizer step Lightning's loggers write the current metrics at (the epoch loop's
    `_batches_that_stepped`): during accumulation, the step the learning rate belongs to."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_at_logging_steps(trainer, metrics: Callable[[], dict[str, float]]) -> None:
    """Write `metrics()` (computed only then) to the loggers when this is a logging step, at the
    step Lightning's own logging uses (`self.log` is for the LightningModule; a callback timing
    the previous step writes through the logger connector, as Lightning's `ThroughputMonitor`
    does)."""
    connector = trainer._logger_connector
    if connector.should_update_logs:
        connector.log_metrics(metrics())


def batches_processed(trainer) -> int:
    """Micro-batches the fit loop has trained on (the loader runs one ahead: Lightning prefetches
    a batch to spot the last)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)


def restate_batch_progress(checkpoint: dict[str, Any], batches: int) -> None:
    """Rewrite a checkpoint's fit-loop batch counters to `batches` micro-batches in all, for a
    resume on another world or micro-batch size: the total and the current epoch's `processed`
    scale by the same ratio (the same samples, in this run's micro-batches), the other counters
    keep their offsets from `processed`. Lightning restores the counters as saved; the schema is
    its checkpoint's `loops` entry."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if progress is None:
        return
    old = progress["total"]["processed"]
    for counters in (progress["total"], progress["current"]):
        processed = counters["processed"]
        now, rest = divmod(processed * batches, old) if old else (batches, 0)
        if rest:
            raise ValueError(
                f"the checkpoint stopped {processed} of its {old} micro-batches into its epoch, "
                f"no whole number of this run's {batches}; resume with its micro-batch size"
            )
        for key in ("ready", "started", "processed", "completed"):
            counters[key] = now + counters[key] - processed


def saved_batches_processed(checkpoint: dict[str, Any]) -> int | None:
    """The micro-batches a checkpoint's fit loop had trained on, None when it has no loops."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    return None if progress is None else progress["total"]["processed"]


def check_sigterm_at_logging_steps(trainer) -> None:
    """Lightning broadcasts a SIGTERM flag from rank 0 and reads it on the host before every
    micro-batch (the epoch loop's `_broadcast_sigterm_tensor`): a collective and a device sync
    each time. Wrapped to run only before the first micro-batch of a step that follows a logging
    step (whose metrics the host reads anyway): a run stops within `log_every_n_steps` steps of
    the signal, and no other step waits on the device. A Lightning without it is left alone."""
    loop = trainer.fit_loop.epoch_loop
    check: Callable[[], None] | None = getattr(loop, "_broadcast_sigterm_tensor", None)
    if check is None or getattr(check, "_at_logging_steps", False):
        return
    every = max(1, int(trainer.log_every_n_steps or 1))

    def at_step_start() -> None:
        first = loop.batch_progress.current.ready % trainer.accumulate_grad_batches == 0
        if first and trainer.global_step > 0 and trainer.global_step % every == 0:
            check()

    at_step_start._at_logging_steps = True
    loop._broadcast_sigterm_tensor = at_step_start


def validate_without_inference_mode(trainer) -> None:
    """Run the evaluation loops under `no_grad` instead of `inference_mode` (FSDP2's unsharding
    has failed inside inference mode). `Trainer(inference_mode=...)` sets each loop's flag at
    construction; a strategy can only change the loops' own attribute."""
    for loop in (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop):
        loop.inference_mode = False


def shard_over_every_rank(strategy) -> None:
    """`ModelParallelStrategy(data_parallel_size="auto")` means one replica per node; FSDP2 over
    every rank is what a recipe's `auto` means here. The strategy resolves "auto" itself in
    `setup_environment` from this attribute (the Trainer's and Fabric's strategies alike)."""
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = (
            strategy.num_nodes * strategy.num_processes // int(strategy._tensor_parallel_size)
        )


def data_parallel_size(strategy) -> int:
    """The resolved data-parallel size of a `ModelParallelStrategy` (after `setup_environment`)."""
    return int(strategy._data_parallel_size)


def save_missing_final_checkpoint(callback, trainer) -> None:
    """Save the top-k and `last` checkpoints of the current step unless this step is saved: a run
    that ends between two periodic saves keeps its final weights. `ModelCheckpoint` has no public
    method that saves now; these are the ones its periodic save calls."""
    if trainer.global_step and callback._last_global_step_saved != trainer.global_step:
        monitor = callback._monitor_candidates(trainer)
        callback._save_topk_checkpoint(trainer, monitor)
        callback._save_last_checkpoint(trainer, monitor)


def process_group_settings(strategy) -> tuple[str, Any] | None:
    """The backend and collective timeout a multi-process strategy (Trainer's or Fabric's DDP and
    ModelParallel) gives `init_process_group`, None for a single-device strategy. Lightning
    resolves them inside its private `_setup_distributed`; tinyrecipe starts the process group
    itself under torchrun (`tinyrecipe.train.elastic`) and must pass the same."""
    resolve = getattr(strategy, "_get_process_group_backend", None)
    if resolve is None:
        return None
    return resolve(), strategy._timeout

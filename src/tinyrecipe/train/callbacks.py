"""What Lightning's callbacks lack for us: MFU from our FLOPs formula and our peak table, timed
once per optimizer step; the lr written once per step; checkpoint defaults for step-based
runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from tinyrecipe._lightning import (
    log_at_logging_steps,
    save_missing_final_checkpoint,
    should_accumulate,
    steps_logged_at,
)
from tinyrecipe.checkpoint import AtomicCheckpointIO, refuse_new_run_into
from tinyrecipe.io import link
from tinyrecipe.planning.flops import device_peak
from tinyrecipe.train.elastic import restart_count, start_watchdog
from tinyrecipe.train.journal import Journal
from tinyrecipe.watchdog import DEFAULT_TIMEOUT_S, Watchdog, beat


def is_logging_step(trainer) -> bool:
    """Whether the optimizer step just taken is one whose metrics the Trainer logs."""
    return trainer.global_step % max(1, trainer.log_every_n_steps) == 0


class TokenThroughputMonitor(Callback):
    """Tokens/s and MFU per optimizer step on Lightning's `Throughput` utility, with MFU against
    a peak per device: `peak_flops` when given; else a GPU's datasheet bf16 figure from our
    table; else (a CPU, which has none) the matmul FLOP/s measured at setup in the run's
    precision, with its threads. Logs train/device/{batches,samples,items,flops}_per_sec and
    train/device/mfu (items = tokens; batches = micro-batches), over the last `window_size`
    optimizer steps.

    It never synchronises the device to time a step: it adds up a step's micro-batches on the
    host and records an event when the step (optimizer included) is queued; at the end of the
    next step it waits for that event, while the device still has the newer step's work, and
    times the step it marks. The figures lag one step. Validation, checkpoint saves and
    downstream evaluation are left out (`pause`: the clock stops until `resume`, at the latest
    when the next training batch starts)."""

    def __init__(self, peak_flops: float | None = None, window_size: int = 100) -> None:
        self.peak_flops, self.window_size = peak_flops, window_size
        self.available_flops: float | None = None
        self._throughput: Throughput | None = None
        self._step = [0, 0, 0, 0.0]  # micro-batches, samples, tokens, FLOPs of the running step
        self._totals = [0, 0, 0]  # micro-batches, samples, tokens of the steps timed so far
        self._queued = None  # (device event, that step's counts): the step not yet timed
        self._t0 = 0.0
        self._paused_at: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        peak, source = device_peak(device, str(trainer.precision), self.peak_flops)
        if device.type != "cuda" or peak is None:
            rank_zero_info(f"tinyrecipe: MFU peak {peak or 0:,.3g} FLOP/s ({source})")
        self.available_flops = peak
        self._throughput = Throughput(
            available_flops=peak, world_size=trainer.world_size, window_size=self.window_size
        )

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        self._throughput.reset()
        self._totals, self._queued, self._paused_at = [0, 0, 0], None, None
        self._t0 = time.perf_counter()

    @rank_zero_only
    def on_train_batch_start(self, trainer, *args) -> None:
        self.resume()

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *_) -> None:
        step = self._step
        step[0] += 1
        step[1] += batch["input_ids"].size(0)
        step[2] += batch["input_ids"].numel()
        step[3] += pl_module.flops_per_batch
        if should_accumulate(trainer):
            return
        event = DeviceEvent(trainer.strategy.root_device)
        self._time_queued(trainer)
        self._queued, self._step = (event, step), [0, 0, 0, 0.0]

    def _time_queued(self, trainer) -> None:
        """Wait for the queued step's event and add that step to the figures."""
        if self._queued is None:
            return
        (event, (batches, samples, tokens, flops)), self._queued = self._queued, None
        done = event.wait()
        self._totals = [
            a + b for a, b in zip(self._totals, (batches, samples, tokens), strict=True)
        ]
        self._throughput.update(
            time=done - self._t0,
            batches=self._totals[0],
            samples=self._totals[1],
            lengths=self._totals[2],
            flops=flops,
        )
        log_at_logging_steps(
            trainer, lambda: {f"train/{k}": v for k, v in self._throughput.compute().items()}
        )

    @rank_zero_only
    def pause(self, trainer) -> None:
        """Stop training's clock, having timed the step still queued (its event is waited for
        now, before the pause's work)."""
        if self._paused_at is None:
            self._time_queued(trainer)
            self._paused_at = time.perf_counter()

    @rank_zero_only
    def resume(self) -> None:
        """Start training's clock again; the pause leaves it."""
        if self._paused_at is not None:
            self._t0 += time.perf_counter() - self._paused_at
            self._paused_at = None

    def on_validation_start(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self.pause(trainer)

    def on_save_checkpoint(self, trainer, *args) -> None:
        self.pause(trainer)


@contextmanager
def training_clock_paused(trainer) -> Iterator[None]:
    """The time inside is not training time for the throughput monitor (downstream evaluation
    inside a training step's hooks)."""
    monitors = [c for c in trainer.callbacks if isinstance(c, TokenThroughputMonitor)]
    for monitor in monitors:
        monitor.pause(trainer)
    try:
        yield
    finally:
        for monitor in monitors:
            monitor.resume()


class DeviceEvent:
    """The point in the device's queue where the host is now. `wait()` returns the time the
    device passed it: for CUDA, waiting on an event recorded here; on a device that runs
    synchronously (a CPU), the time it was made."""

    def __init__(self, device: torch.device) -> None:
        self.event, self.time = None, time.perf_counter()
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> float:
        if self.event is None:
            return self.time
        self.event.synchronize()
        return time.perf_counter()


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, writing once per logged optimizer step (Lightning's asks
    "is this a logging step?" at every micro-batch, and the answer stays yes for every
    micro-batch of that step)."""

    _logged_step = -1

    def on_train_batch_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        step = steps_logged_at(trainer)  # the step the lr applies to
        if step == self._logged_step:
            return
        self._logged_step = step
        super().on_train_batch_start(trainer, *args, **kwargs)


class Checkpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint with a step-based run's defaults: every `every_n_train_steps`
    optimizer steps into `<default_root_dir>/checkpoints` (`dirpath` unset), the newest
    `save_top_k` kept, `last.ckpt` a link to the newest (never a second full copy), and a final
    checkpoint when the run ends between two periodic ones."""

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 1000,
        save_top_k: int = 2,
        save_last: bool | str = "link",
        filename: str | None = "{step}",
        monitor: str | None = "step",
        mode: str = "max",
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        # No "-v1" versions: a directory holds one run (`on_train_start`), so `last.ckpt` is
        # always the one name `--ckpt_path last`, `generate` and `eval` read.
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_last=save_last,
            monitor=monitor,
            mode=mode,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO) and trainer.world_size > 1:
            # every rank reads the file: a read that fails on one makes all fall back alike
            io.any_failed = lambda failed: trainer.strategy.reduce_boolean_decision(
                failed, all=False
            )
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        # For the Trainer used without the CLI, whose before_fit refuses earlier (here, not in
        # on_fit_start: FSDP2 restores a checkpoint after that hook)
        if trainer.ckpt_path is None:
            refuse_new_run_into(self.dirpath)
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        save_missing_final_checkpoint(self, trainer)
        super().on_train_end(trainer, pl_module)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        # Overrides ModelCheckpoint's private link step (checked in tests/test_lightning_private):
        # Lightning removes the old link, then makes the new one; `io.link` renames the new one
        # over it, so `last.ckpt` always exists.
        if trainer.is_global_zero:
            link(filepath, linkpath)
        trainer.strategy.barrier()


class RunJournal(Callback):
    """Writes the run directory's journal (`tinyrecipe.train.journal`, rank 0): the start (step,
    world size, recipe hash, the checkpoint resumed and why), progress at each logging step,
    each checkpoint written with its duration, and the end; logs train/goodput at logging
    steps. `tinyrecipe status RUN_DIR` reads it. `enabled: false` turns it off."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.journal: Journal | None = None
        self.recipe_sha256: str | None = None  # the CLI's: the parsed recipe's hash
        self.why: str | None = None  # "given", "auto" or "fresh": how the start was chosen
        self._trainer = None
        self._fallback: tuple[Path, Path, str] | None = None  # (damaged, used, why)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        self._trainer = trainer
        self.journal = Journal(trainer.default_root_dir, enabled=trainer.is_global_zero)
        for writer in (trainer.strategy.checkpoint_io, trainer.strategy):
            if hasattr(writer, "on_write"):
                writer.on_write = self._written
                writer.on_fallback = self._fell_back

    def _fell_back(self, path: Path, used: Path, why: str) -> None:
        self._fallback = (path, used, why)

    def _written(self, path: Path, seconds: float) -> None:
        step = self._trainer.global_step if self._trainer is not None else None
        self.journal.record("checkpoint", step=step, path=str(path), seconds=round(seconds, 3))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.journal is None:
            return
        resumed = str(trainer.ckpt_path) if trainer.ckpt_path else None
        why = self.why or ("given" if resumed else "fresh")
        damaged = {}
        if self._fallback is not None:  # the checkpoint asked for was unreadable
            path, used, reason = self._fallback
            resumed, why = str(used), "fall-back"
            damaged = {"unreadable": str(path), "unreadable_why": reason}
        self.journal.record(
            "start",
            step=trainer.global_step,
            max_steps=trainer.max_steps,
            world_size=trainer.world_size,
            recipe_sha256=self.recipe_sha256,
            resumed_from=resumed,
            why=why,
            restart=restart_count() or int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            **damaged,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.journal is None or should_accumulate(trainer):
            return
        step = trainer.global_step
        if not is_logging_step(trainer):
            return  # the metrics are read on the host at logging steps only
        metrics = trainer.callback_metrics

        def value(key: str):
            return float(metrics[key]) if key in metrics else None

        self.journal.record(
            "progress",
            step=step,
            tokens=value("train/tokens_seen"),
            loss=value("train/loss"),
            skipped=int(value("train/skipped_steps") or 0),
            spikes=int(value("train/spike_skips") or 0),
        )
        goodput = self.journal.goodput()
        if goodput is not None and trainer.is_global_zero:
            pl_module.log("train/goodput", goodput, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.journal is not None:
            short = 0 < trainer.max_steps and trainer.global_step < trainer.max_steps
            reason = "stopped" if short else "done"  # stopped: requeued, or a callback's stop
            self.journal.record("end", step=trainer.global_step, reason=reason)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.journal is not None:
            self.journal.record("end", step=trainer.global_step, reason=type(exception).__name__)


def run_journal(trainer) -> Journal | None:
    """This rank's journal of the run (`RunJournal`'s: rank 0's writes), or None when off."""
    for callback in trainer.callbacks:
        if isinstance(callback, RunJournal) and callback.journal is not None:
            return callback.journal
    return None


class HangWatchdog(Callback):
    """Ends every rank still running when the run makes no progress for `timeout_s` seconds,
    with one line naming the step and the rank that stopped (`tinyrecipe.watchdog`), and records
    the hang in the journal; the launcher's restart then resumes the run. Progress: each training
    and validation batch, checkpoint and downstream-evaluation batch. Recipe key `watchdog:`;
    `timeout_s: null` turns it off. The default, 600 s, is far above any pause of the flagship
    run (a step ~6 s, a sharded checkpoint well under a minute) and below the process group's own
    30-minute collective timeout."""

    def __init__(
        self, timeout_s: float | None = DEFAULT_TIMEOUT_S, interval_s: float | None = None
    ) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"watchdog.timeout_s is {timeout_s}; use seconds > 0, or null")
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.watchdog: Watchdog | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.watchdog = start_watchdog(
            self.timeout_s,
            self.interval_s,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            step=trainer.global_step,
            journal=run_journal(trainer),
        )

    def on_train_batch_start(self, trainer, *args) -> None:
        beat(trainer.global_step)

    def on_train_batch_end(self, trainer, *args) -> None:
        beat(trainer.global_step)

    def on_validation_batch_start(self, *args) -> None:
        beat()

    def on_validation_batch_end(self, *args) -> None:
        beat()

    def on_save_checkpoint(self, *args) -> None:
        beat()

    def _stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def teardown(self, *args, **kwargs) -> None:  # after every on_train_end: the final save too
        self._stop()

    def on_exception(self, *args) -> None:
        self._stop()


class SlurmRequeue(Callback):
    """Under SLURM (`#SBATCH --requeue --signal=USR1@180`): the requeue signal sets a flag; at the
    next logging step, once any rank has it, every rank saves a checkpoint of that whole step,
    `requeue` goes into the journal and the run stops; then rank 0 runs `scontrol requeue` on
    the job, which resumes from that checkpoint (`ckpt_path: auto`). Installed first, it keeps
    Lightning's own SLURM handler, which saves wherever the signal lands (mid-step), out.
    Inactive outside SLURM (no SLURM_NTASKS, or an interactive job)."""

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        if not isinstance(getattr(signal, signal_name, None), signal.Signals):
            raise ValueError(
                f"slurm_requeue.signal_name {signal_name!r} is not a signal; use the one of the "
                "sbatch script's --signal, e.g. SIGUSR1"
            )
        self.signal = getattr(signal, signal_name)
        self.requested = False
        self.stopping = False  # the run stops to be requeued
        self.active = False
        self._previous = None
        self._job: str | None = None  # to requeue once the run has stopped

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and SLURMEnvironment.detect():
            self._previous, self.active = signal.signal(self.signal, self._handle), True

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if not self.active or should_accumulate(trainer) or not is_logging_step(trainer):
            return  # the ranks agree at logging steps only (a host read)
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the run ends here: nothing to requeue
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        callback = trainer.checkpoint_callback
        if callback is not None:
            save_missing_final_checkpoint(callback, trainer)
        job = os.environ.get("SLURM_JOB_ID", "")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if (journal := run_journal(trainer)) is not None:
            journal.record("requeue", step=trainer.global_step, job=job)
        self._job = job if trainer.is_global_zero else None
        self.stopping = True
        trainer.should_stop = True

    def _restore(self) -> None:
        if self.active:  # a handler installed from C reads back as None
            signal.signal(self.signal, signal.SIG_DFL if self._previous is None else self._previous)
            self.active = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Requeues last, once the checkpoint and the journal's end are written: SLURM answers
        `scontrol requeue` with a SIGTERM to the job."""
        self._restore()
        job, self._job = self._job, None
        if job is None:
            return
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            said = "requeued" if done.returncode == 0 else f"scontrol: {done.stderr.strip()}"
        except OSError as err:
            said = f"not requeued: scontrol: {err.strerror}"
        rank_zero_info(
            f"tinyrecipe: SLURM {self.signal.name} at step {trainer.global_step}: checkpoint "
            f"saved; job {job} {said}"
        )


def stopping_for_requeue(trainer) -> bool:
    """Whether the run stops to be requeued (`SlurmRequeue`), not at its end."""
    return any(isinstance(c, SlurmRequeue) and c.stopping for c in trainer.callbacks)


class DownstreamEval(Callback):
    """lm-evaluation-harness tasks scored inside `fit` every `every_n_steps` optimizer steps, at
    the end, and before the first step with `at_start`, on every rank with the requests split
    between them (a sharded model steps together), logged as `eval/<task>/<metric>` and printed
    on rank 0. The score at a step equals `tinyrecipe eval` of that step's checkpoint (tested).
    No `tasks`: off; `every_n_steps: 0`: the end of training only (and the start with
    `at_start`).

    A step's evaluation runs when the next step starts, after that step's checkpoint is saved
    (a failed evaluation loses no training); the step due is in the checkpoint, so a run
    stopped for a SLURM requeue scores it after the resume instead of spending the requeue's
    time. At the end the final checkpoint is saved first.

    The tokenizer is `tokenizer_dir`, else the DataModule's `tokenizer_dir`."""

    def __init__(
        self,
        tasks: str | list[str] | None = None,
        every_n_steps: int = 5000,
        limit: int | None = None,
        include_path: str | None = None,
        tokenizer_dir: str | None = None,
        batch_size: int = 8,
        num_fewshot: int | None = None,
        at_start: bool = False,
        add_bos_token: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(
                f"downstream_eval.every_n_steps is {every_n_steps}; use a number of optimizer "
                "steps, or 0 to score only at the end of training"
            )
        self.tasks, self.every_n_steps, self.limit = tasks, every_n_steps, limit
        self.include_path, self.tokenizer_dir, self.batch_size = (
            include_path,
            tokenizer_dir,
            batch_size,
        )
        self.num_fewshot, self.at_start, self.add_bos_token = num_fewshot, at_start, add_bos_token
        self.seconds = 0.0  # spent evaluating, for the overhead
        self._last_step: int | None = None
        self._due: int | None = None  # the step to score when the next one starts

    def on_fit_start(self, trainer, pl_module) -> None:
        # Load the tasks now: a task whose data cannot be had fails in one line at the start,
        # not hours into the run at the first evaluation.
        if self.tasks:
            from tinyrecipe.evaluation import load_tasks, task_manager, task_names

            names = task_names(self.tasks)
            load_tasks(names, task_manager(self.include_path, names))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.tasks and self.at_start and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *_) -> None:
        if not self.tasks or should_accumulate(trainer):
            return
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._due = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, *_) -> None:
        due, self._due = self._due, None
        if self.tasks and due is not None and due == trainer.global_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.tasks or not trainer.global_step or stopping_for_requeue(trainer):
            return
        if self._last_step != trainer.global_step:  # the final weights are always scored
            self._due = None
            if trainer.checkpoint_callback is not None:
                save_missing_final_checkpoint(trainer.checkpoint_callback, trainer)
            self.run(trainer, pl_module)

    @property
    def state_key(self) -> str:  # several evaluations (other tasks or cadence) keep their own
        return f"{type(self).__qualname__}{{tasks={self.tasks!r}, every={self.every_n_steps}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"due": self._due}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._due = state_dict.get("due")

    def run(self, trainer, pl_module) -> dict[str, float] | None:
        from tinyrecipe.evaluation import downstream_metrics

        tokenizer_dir = self.tokenizer_dir or getattr(trainer.datamodule, "tokenizer_dir", None)
        start = time.perf_counter()
        with training_clock_paused(trainer):
            metrics = downstream_metrics(
                pl_module.model,
                tokenizer_dir,
                self.tasks,
                limit=self.limit,
                include_path=self.include_path,
                batch_size=self.batch_size,
                num_fewshot=self.num_fewshot,
                add_bos_token=self.add_bos_token,
                autocast=trainer.precision_plugin.forward_context,
                distributed=trainer.world_size > 1,
            )
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self._last_step = trainer.global_step
        if metrics is None:  # not rank 0
            return None
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items())
        rank_zero_info(
            f"tinyrecipe: downstream eval at step {trainer.global_step} ({seconds:.0f} s): {shown}"
        )
        return metrics


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar for a run measured in optimizer steps: `step 120/1000`, moving
    once per step (Lightning's counts micro-batches of an 'epoch' the endless stream never
    ends). The CLI puts it in unless a recipe brings its own bar or turns bars off."""

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)  # a resumed run starts mid-epoch: no epoch start comes

    def on_train_epoch_start(self, trainer, *args) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer) -> None:
        bar = self.train_progress_bar
        if trainer.max_steps <= 0 or bar is None:
            return
        bar.set_description("step", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.n = trainer.global_step  # a resumed run starts where it was

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if should_accumulate(trainer) or bar is None or bar.disable:
            return
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

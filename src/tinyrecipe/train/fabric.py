"""The same training as `tinyrecipe fit`, written out as one loop on Lightning Fabric (TinyLlama's
own trainer is such a loop), for researchers who want to own it or run it from a notebook.

Everything but the loop is shared with the Trainer path: the recipe (read by `tinyrecipe fabric`
with the same parser as `fit`), the builder (`train.build`: the decoder, checkpointing, compile,
FSDP2 sharding from the meta device, AdamW and the schedule), the step (`train.step`: loss, one
all-reduce for norm and loss, clipping, the non-finite skip), the DataModules, the evaluation
sums, the FLOPs formula and MFU peak, and the checkpoint layout (`state_dict` with `model.` keys
+ `hyper_parameters`, so `generate`, `convert`, `eval` and `init_from` read its checkpoints). On
the same seed and data its losses equal the Trainer's (tested, fp32 CPU).

    tinyrecipe fabric --config recipes/quickstart.yaml --trainer.max_steps 50
    tinyrecipe fabric --config recipes/quickstart.yaml --resume out/quickstart/fabric/last.ckpt

From Python: `losses = tinyrecipe.train.fabric.train(recipe_dict)`. The loop is `set_up`, then
`train_step` and `after_step` per optimizer step.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from tinyrecipe._lightning import shard_over_every_rank
from tinyrecipe.checkpoint import (
    checkpoint_config,
    refuse_new_run_into,
    refuse_sharded,
    shape_diff,
)
from tinyrecipe.data.position import StreamPosition
from tinyrecipe.faults import failpoint
from tinyrecipe.io import link, publish, remove, remove_stale, temp_sibling
from tinyrecipe.model.parallelize import hsdp_mesh, keep_gathered, reshard
from tinyrecipe.planning.flops import device_peak, train_flops_per_token
from tinyrecipe.train.build import (
    adapter_params,
    build_guards,
    build_model,
    build_optimizer,
    describe,
    refuse_fsdp1,
)
from tinyrecipe.train.callbacks import DownstreamEval
from tinyrecipe.train.elastic import init_process_group, start_watchdog
from tinyrecipe.train.journal import Journal
from tinyrecipe.train.optim import set_scheduled_lr
from tinyrecipe.train.settings import ModelSettings
from tinyrecipe.train.step import (
    StepStats,
    finish_step,
    per_token_loss,
    step_loss,
    val_metrics,
    val_sums,
)
from tinyrecipe.watchdog import DEFAULT_TIMEOUT_S, beat

DEFAULT_DATA = "tinyrecipe.data.datamodule.MixedStreamingDataModule"
FSDP2_NAMES = ("fsdp2", "FSDP2Strategy", "ModelParallelStrategy")


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_fsdp2(spec: Any) -> bool:
    name = spec.get("class_path", "") if isinstance(spec, dict) else str(spec)
    return name.rpartition(".")[2] in FSDP2_NAMES


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads of a recipe besides `model:` and `data:`, read once."""

    root: Path
    precision: str
    strategy: Any
    accelerator: str
    devices: Any
    num_nodes: int
    # seed_everything: a seed; true: Lightning's seed_everything(None); false: none
    seed: int | bool
    max_steps: int
    accumulate: int
    clip: float | None
    val_every: int  # optimizer steps (the recipe's val_check_interval counts micro-batches)
    sanity_val: bool
    log_every: int
    save_every: int
    keep: int  # step checkpoints kept; 0: all
    downstream: dict = field(default_factory=dict)
    watchdog: dict = field(default_factory=dict)  # the recipe's `watchdog:` (timeout_s, interval_s)

    @classmethod
    def from_recipe(cls, recipe: dict) -> LoopSettings:
        t = recipe.get("trainer") or {}
        checkpoint = recipe.get("checkpoint") or {}
        accumulate = int(t.get("accumulate_grad_batches") or 1)
        top_k = checkpoint.get("save_top_k")
        # Lightning's default 2; -1 all (0 here); `last` needs at least one
        keep = 2 if top_k is None else (0 if int(top_k) < 0 else max(int(top_k), 1))
        if (t.get("gradient_clip_algorithm") or "norm") != "norm":
            raise ValueError(
                f"trainer.gradient_clip_algorithm: {t['gradient_clip_algorithm']} is not what "
                "`tinyrecipe fabric` does (it clips the norm); use norm, or `tinyrecipe fit`"
            )
        interval = t.get("val_check_interval") or 0
        if not isinstance(interval, int) or interval % accumulate:
            raise ValueError(
                f"trainer.val_check_interval: {interval} is not a whole number of optimizer steps "
                f"for `tinyrecipe fabric` (accumulate_grad_batches {accumulate}); use a multiple "
                f"of {accumulate} micro-batches"
            )
        seed = recipe.get("seed_everything")
        return cls(
            root=Path(t.get("default_root_dir") or "out"),
            precision=str(t.get("precision") or "32-true"),
            strategy=t.get("strategy") or "auto",
            accelerator=t.get("accelerator") or "auto",
            devices=t.get("devices") or "auto",
            num_nodes=t.get("num_nodes") or 1,
            seed=0 if seed is None else seed,
            max_steps=int(t.get("max_steps") or -1),
            accumulate=accumulate,
            clip=t.get("gradient_clip_val"),
            val_every=interval // accumulate,
            sanity_val=t.get("num_sanity_val_steps") == -1,
            log_every=int(t.get("log_every_n_steps") or 50),
            save_every=int(checkpoint.get("every_n_train_steps") or 0),
            keep=keep,
            downstream=dict(recipe.get("downstream_eval") or {}),
            watchdog=dict(recipe.get("watchdog") or {"timeout_s": DEFAULT_TIMEOUT_S}),
        )


class Decoder(torch.nn.Module):
    """Holds the decoder as `.model`, so this loop's checkpoints carry the `model.` key prefix of
    the Trainer's (every reader loads either)."""

    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module | None = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _strategy(spec: Any, settings: ModelSettings, precision: str):
    """The recipe's (Trainer) strategy as a Fabric strategy; FSDP2 shards in `build_model`."""
    if not _is_fsdp2(spec):
        if isinstance(spec, dict):
            name, args = spec["class_path"].rpartition(".")[2], spec.get("init_args") or {}
            return getattr(importlib.import_module("lightning.fabric.strategies"), name)(**args)
        return spec  # "auto", "ddp", ...
    args = dict(spec.get("init_args") or {}) if isinstance(spec, dict) else {}
    args.setdefault("data_parallel_size", "auto")
    args.setdefault("tensor_parallel_size", 1)
    for unused in ("process_group_backend", "timeout"):
        args.pop(unused, None)
    # FSDP2Strategy's own options, applied here as the Trainer path applies them
    reshard_after_forward = args.pop("reshard_after_forward", True)
    reshard_after_backward = args.pop("reshard_after_backward", True)
    shard_group_size = args.pop("shard_group_size", None)

    def parallelize_fn(holder: Decoder, mesh) -> Decoder:
        cuda = mesh.device_type == "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        dp = mesh["data_parallel"]
        holder.model = build_model(
            settings,
            mesh=hsdp_mesh(mesh.device_type, dp.size(), shard_group_size) or dp,
            bf16="bf16" in precision,
            device=device,
            reshard_after_forward=reshard_after_forward,
        )
        return holder

    class FSDP2(ModelParallelStrategy):
        def setup_environment(self) -> None:
            shard_over_every_rank(self)  # as FSDP2Strategy does
            super().setup_environment()

    strategy = FSDP2(parallelize_fn=parallelize_fn, **args)
    strategy.reshard_after_backward = reshard_after_backward  # read by the accumulation loop
    return strategy


def _save(
    fabric: L.Fabric,
    directory: Path,
    step: int,
    state: dict,
    keep: int = 2,
    journal: Journal | None = None,
) -> Path:
    """`directory/step=<step>.ckpt`, written into a temporary sibling every rank agrees on and
    renamed into place by rank 0 once all have written, then `last.ckpt` pointed at it in one
    atomic link swap (as the Trainer path does), then all but the newest `keep` step checkpoints
    deleted: a kill at any moment leaves `last.ckpt` naming a whole checkpoint."""
    start = time.perf_counter()
    path = directory / f"step={step}.ckpt"
    tmp = temp_sibling(path, "fabric")
    reshard(state["state_dict"])  # after an evaluation, gathered weights would not be saved
    if fabric.global_rank == 0:
        remove_stale(path)
    fabric.barrier()
    fabric.save(tmp, state)
    fabric.barrier()
    if fabric.global_rank == 0:
        failpoint("checkpoint.rename")
        publish(tmp, path)
        link(path, directory / "last.ckpt")
        steps = sorted(directory.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        for old in steps[:-keep] if keep > 0 else []:
            remove(old)
    fabric.barrier()
    if journal is not None:
        seconds = round(time.perf_counter() - start, 3)
        journal.record("checkpoint", step=step, path=str(path), seconds=seconds)
    return path


def _load(fabric: L.Fabric, path: str, state: dict, config) -> dict:
    """fabric.load, after refusing in one line a missing path, a sharded checkpoint for a
    one-file strategy and another model shape; then each stateful object (schedule, data
    position, spike window) restored from its saved dict: Lightning's ModelParallelStrategy
    (FSDP2) puts the dict in its place instead (lightning 2.6)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint '{path}' (resume) does not exist")
    if not isinstance(fabric.strategy, ModelParallelStrategy):
        refuse_sharded(Path(path))
    if detail := shape_diff(checkpoint_config(path), config):
        raise ValueError(
            f"checkpoint '{path}' holds another model ({detail}, checkpoint vs recipe); resume "
            "with the recipe that wrote it"
        )
    objects = dict(state)
    remainder = fabric.load(path, state)
    for key, obj in objects.items():
        loaded = state[key]
        if loaded is not obj and isinstance(loaded, dict) and hasattr(obj, "load_state_dict"):
            obj.load_state_dict(loaded)
            state[key] = obj
    return remainder


def evaluate(fabric: L.Fabric, model, loaders: list, sources: list[tuple[str, float]]) -> dict:
    """val/loss[/<source>] and val/ppl[/<source>], every rank in one reduction for all loaders."""
    model.eval()
    sums = torch.zeros(len(loaders), 2, device=fabric.device)
    with torch.no_grad():
        for i, loader in enumerate(loaders):
            for batch in loader:
                beat()  # progress, for the hang watchdog
                sums[i] += val_sums(model, batch)
    model.train()
    totals = fabric.all_reduce(sums, reduce_op="sum").tolist()
    return val_metrics([(n, w, *t) for (n, w), t in zip(sources, totals, strict=True)])


@dataclass
class Run:
    """A set-up run: what `train_step` and `after_step` work on."""

    fabric: L.Fabric
    loop: LoopSettings
    settings: ModelSettings
    model: Any  # the Decoder as Fabric set it up
    decoder: torch.nn.Module
    optimizer: Any
    scheduler: Any
    data: Any
    batches: Any
    train_loader: Any
    val_loaders: list
    sources: list
    state: dict
    guard: Any
    spikes: Any
    per_token: bool
    peak: float | None
    step: int = 0
    start_step: int = 0
    clock: tuple[int, float] = (0, 0.0)  # (step, time) where the logging window began
    tokens_before: int | None = None
    tokens_per_step: int = 0
    seq_len: int = 0
    spike_count: torch.Tensor | None = None
    lr: float = 0.0  # the learning rate of the last step taken
    journal: Journal | None = None
    window: list = field(default_factory=list)  # the logging window's step losses, on the device
    losses: list = field(default_factory=list)
    every_eval: int = 0


def set_up(recipe: dict, resume: str | None = None) -> Run:
    """Fabric, the model, optimizer and schedule, the data and loaders, resumed from `resume`."""
    loop = LoopSettings.from_recipe(recipe)
    settings = ModelSettings.from_dict(dict(recipe.get("model") or {}))
    refuse_fsdp1(loop.strategy)
    if resume is None:
        directory = loop.root / "fabric"
        refuse_new_run_into(directory, f"--resume {directory / 'last.ckpt'}")
    data_spec = dict(recipe.get("data") or {})
    data_class = _import(data_spec.pop("class_path", DEFAULT_DATA))
    if not issubclass(data_class, StreamPosition):  # a rank-aware stream with a position
        raise ValueError(
            f"tinyrecipe fabric trains on a DataModule that streams with a position "
            f"(tinyrecipe.data.position.StreamPosition); {data_class.__name__} does not"
        )
    data_args = dict(data_spec.pop("init_args", {}), **data_spec)
    from lightning.fabric.loggers import TensorBoardLogger

    strategy = _strategy(loop.strategy, settings, loop.precision)
    fabric = L.Fabric(
        accelerator=loop.accelerator,
        devices=loop.devices,
        num_nodes=loop.num_nodes,
        strategy=strategy,
        precision=loop.precision,
        loggers=TensorBoardLogger(root_dir=loop.root, name="fabric", version=0),
    )
    init_process_group(fabric.strategy)  # restart-safe under torchrun
    fabric.launch()
    if loop.seed is not False:
        fabric.seed_everything(None if loop.seed is True else loop.seed)
    config = settings.model_config
    data = data_class(**data_args, vocab_size=config.vocab_size)
    holder = Decoder()
    if not _is_fsdp2(loop.strategy):
        holder.model = build_model(settings, device=fabric.device)
    model = fabric.setup(holder)
    optimizer, scheduler = build_optimizer(holder.model, settings, loop.max_steps)
    optimizer = fabric.setup_optimizers(optimizer)
    fabric.print(describe(settings, loop.precision, fabric.device))

    data.setup("fit")
    if hasattr(data, "set_rank_world"):
        data.set_rank_world(fabric.global_rank, fabric.world_size, loop.accumulate, fabric.device)
    guard, spikes = build_guards(settings)
    state = {
        "state_dict": model,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "datamodule": data,
        "hyper_parameters": settings.as_dict(),
        "global_step": 0,
    }
    if spikes is not None:
        state["spike_skipper"] = spikes
    step = 0
    if resume:
        remainder = _load(fabric, resume, state, config)
        step = state["global_step"] = int(remainder.get("global_step", state["global_step"]))
        set_scheduled_lr(scheduler)  # this recipe's schedule from the resumed step on
    train_loader = fabric.setup_dataloaders(data.train_dataloader(), use_distributed_sampler=False)
    val = data.val_dataloader() or []
    val_loaders = [
        fabric.setup_dataloaders(v) for v in ([val] if isinstance(val, DataLoader) else val)
    ]
    position = data.state_dict().get("samples_consumed") if hasattr(data, "state_dict") else None
    run = Run(
        fabric=fabric,
        loop=loop,
        settings=settings,
        model=model,
        decoder=holder.model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        batches=iter(train_loader),
        train_loader=train_loader,
        val_loaders=val_loaders,
        sources=data.val_sources() if hasattr(data, "val_sources") else [],
        state=state,
        guard=guard,
        spikes=spikes,
        per_token=per_token_loss(data),
        peak=device_peak(fabric.device, loop.precision)[0],
        step=step,
        start_step=step,
        tokens_before=position * data.block_size if position is not None else None,
        spike_count=torch.zeros((), device=fabric.device),
    )
    fabric.print(
        f"tinyrecipe fabric: {fabric.world_size} process(es), {loop.precision}, {loop.root}"
    )
    run.journal = Journal(loop.root / "fabric", enabled=fabric.global_rank == 0)
    run.journal.record(
        "start",
        step=step,
        max_steps=loop.max_steps,
        world_size=fabric.world_size,
        recipe_sha256=hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16],
        resumed_from=resume,
        why="given" if resume else "fresh",
    )
    if run.val_loaders and loop.sanity_val and step == 0:
        fabric.log_dict(evaluate(fabric, model, run.val_loaders, run.sources), step=0)
    downstream = loop.downstream
    if downstream.get("tasks"):
        run.every_eval = DownstreamEval(**downstream).every_n_steps  # its defaults and checks
        downstream["tokenizer_dir"] = downstream.get("tokenizer_dir") or getattr(
            data, "tokenizer_dir", None
        )
        if downstream.pop("at_start", False) and step == 0:
            _downstream(run, 0)
    run.clock = (step, time.perf_counter())
    return run


def _next_batch(run: Run) -> dict:
    batch = next(run.batches, None)
    if batch is None:  # an epoch of SFT rows ended: the next one starts
        run.batches = iter(run.train_loader)
        batch = next(run.batches)
    return batch


def train_step(run: Run) -> StepStats:
    """One optimizer step: the micro-batches (gradients synchronised and resharded on the last
    only), `finish_step`, AdamW and the schedule."""
    fabric, loop = run.fabric, run.loop
    reshard_after_backward = getattr(fabric.strategy, "reshard_after_backward", True)
    loss_sum = z_sum = tokens = None
    for micro in range(loop.accumulate):
        batch = _next_batch(run)
        not_last = micro < loop.accumulate - 1
        with (
            fabric.no_backward_sync(run.model, enabled=not_last),
            keep_gathered(run.decoder, enabled=not_last and not reshard_after_backward),
        ):
            loss, z, n = step_loss(run.model, batch, run.per_token)
            if n is not None:
                tokens = n if tokens is None else tokens + n
            fabric.backward(loss / loop.accumulate)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if z is not None:
            z_sum = z if z_sum is None else z_sum + z
        run.tokens_per_step = batch["labels"].numel() * loop.accumulate * fabric.world_size
        run.seq_len = batch["labels"].size(1)
    stats = finish_step(
        list(run.decoder.parameters()),
        loss_sum,
        loop.accumulate,
        max_norm=loop.clip,
        optimizer=run.optimizer.optimizer,
        z_sum=z_sum,
        spikes=run.spikes,
        tokens=tokens,
    )
    if stats.spike is not None:
        run.spike_count = run.spike_count + stats.spike
    run.lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.guard.record(stats, run.step)
    run.step += 1
    return stats


def after_step(run: Run, stats: StepStats) -> None:
    """Logs at logging steps (one host read of the window's losses), validation, downstream
    evaluation and checkpoints when they are due."""
    fabric, loop, step = run.fabric, run.loop, run.step
    run.window.append(stats.loss)
    last = step == loop.max_steps
    if step % loop.log_every == 0 or last:
        run.losses += torch.stack(run.window).tolist()  # one read per logging window
        run.window.clear()
        done = step - run.start_step
        (since, began), now = run.clock, time.perf_counter()
        tokens_per_sec = run.tokens_per_step * (step - since) / (now - began)
        run.clock = (step, now)
        per_token = train_flops_per_token(
            run.settings.model_config, run.seq_len, adapter_params(run.settings)
        )
        before = run.tokens_before
        if before is None:
            before = run.start_step * run.tokens_per_step
        metrics = {
            "train/loss": run.losses[-1],
            "train/grad_norm": stats.grad_norm.item(),
            "lr": run.lr,
            "train/tokens_seen": float(before + done * run.tokens_per_step),
            "train/tokens_per_sec": tokens_per_sec,
            "train/skipped_steps": float(run.guard.skipped),
        }
        if run.spikes is not None:
            metrics["train/spike_skips"] = run.spike_count.item()
        if stats.z_loss is not None:
            metrics["train/z_loss"] = stats.z_loss.item()
        run.journal.record(
            "progress",
            step=step,
            tokens=metrics["train/tokens_seen"],
            loss=metrics["train/loss"],
            skipped=run.guard.skipped,
            spikes=int(metrics.get("train/spike_skips", 0)),
        )
        if (goodput := run.journal.goodput()) is not None:
            metrics["train/goodput"] = goodput
        if run.peak:
            metrics["train/mfu"] = tokens_per_sec * per_token / fabric.world_size / run.peak
        fabric.log_dict(metrics, step=step)
        fabric.print(f"step {step}: loss {metrics['train/loss']:.4f}")
    pause = time.perf_counter()  # validation, evaluation and saving are not training time
    if run.val_loaders and loop.val_every and (step % loop.val_every == 0 or last):
        fabric.log_dict(evaluate(fabric, run.model, run.val_loaders, run.sources), step=step)
    if loop.save_every and step % loop.save_every == 0 and not last:
        run.state["global_step"] = step
        _save(fabric, loop.root / "fabric", step, run.state, loop.keep, run.journal)
    if loop.downstream.get("tasks") and run.every_eval and step % run.every_eval == 0 and not last:
        _downstream(run, step)  # after the step's checkpoint: a failed evaluation loses nothing
    run.clock = (run.clock[0], run.clock[1] + time.perf_counter() - pause)


def _downstream(run: Run, step: int) -> None:
    """The recipe's downstream_eval (the Trainer's DownstreamEval) in this loop."""
    from tinyrecipe.evaluation import downstream_metrics

    spec, fabric = run.loop.downstream, run.fabric
    options = {
        k: v for k, v in spec.items() if k not in ("tasks", "tokenizer_dir", "every_n_steps")
    }
    metrics = downstream_metrics(
        run.decoder,
        spec["tokenizer_dir"],
        spec["tasks"],
        autocast=fabric.autocast,
        distributed=fabric.world_size > 1,
        **options,
    )
    if metrics is not None:
        fabric.log_dict(metrics, step=step)
        fabric.print(f"downstream eval at step {step}: {metrics}")


def train(recipe: dict, resume: str | None = None) -> list[float]:
    """Train `recipe` (a parsed recipe dict); returns the training loss of every optimizer step
    (the mean over its micro-batches and ranks, as the Trainer logs it)."""
    run = set_up(recipe, resume)
    watchdog = start_watchdog(
        run.loop.watchdog.get("timeout_s"),
        run.loop.watchdog.get("interval_s"),
        rank=run.fabric.global_rank,
        world_size=run.fabric.world_size,
        step=run.step,
        journal=run.journal,
    )
    try:
        while run.step < run.loop.max_steps:
            beat(run.step)
            after_step(run, train_step(run))
        run.guard.flush()
        run.state["global_step"] = run.step
        _save(run.fabric, run.loop.root / "fabric", run.step, run.state, run.loop.keep, run.journal)
        if run.loop.downstream.get("tasks") and run.step > run.start_step:
            _downstream(run, run.step)  # the final weights are always scored, as in `fit`
    except BaseException as err:
        run.journal.record("end", step=run.step, reason=type(err).__name__)
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
    run.journal.record("end", step=run.step, reason="done")
    run.fabric.print(f"checkpoint: {run.loop.root / 'fabric' / 'last.ckpt'}")
    return run.losses

"""The same training as `tinyrecipe fit`, written out as one loop on Lightning Fabric (TinyLlama's
own trainer is such a loop), for researchers who want to own it or run it from a notebook.

Everything but the loop is shared with the Trainer path: the recipe (read by `tinyrecipe fabric`
with the same parser as `fit`), `CausalLMModule` (`build_model`: the decoder, checkpointing,
compile, FSDP2 sharding from the meta device; `build_optimizer`: AdamW and the schedule), the
step (`tinyrecipe.train.step`: loss, one all-reduce for norm and loss, clipping, the non-finite
skip), the DataModules, the evaluation sums, the FLOPs formula and MFU peak, and the checkpoint
layout (`state_dict` with `model.` keys + `hyper_parameters`, so `generate`, `convert`, `eval`
and `init_from` read its checkpoints). On the same seed and data its losses equal the Trainer's
(tested, fp32 CPU).

    tinyrecipe fabric --config recipes/quickstart.yaml --trainer.max_steps 50
    tinyrecipe fabric --config recipes/quickstart.yaml --resume out/quickstart/fabric/last.ckpt

From Python: `losses = tinyrecipe.train.fabric.train(recipe_dict)`.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from tinyrecipe._lightning import shard_over_every_rank
from tinyrecipe.data.position import StreamPosition
from tinyrecipe.faults import failpoint
from tinyrecipe.interop.checkpoint import checkpoint_config
from tinyrecipe.io import link, publish, remove, remove_stale, temp_sibling
from tinyrecipe.model.parallelize import hsdp_mesh, keep_gathered, reshard
from tinyrecipe.planning.flops import device_peak
from tinyrecipe.train.callbacks import DownstreamEval
from tinyrecipe.train.checkpoint import refuse_sharded
from tinyrecipe.train.module import (
    CausalLMModule,
    describe,
    refuse_fsdp1,
    set_scheduled_lr,
    shape_diff,
)
from tinyrecipe.train.step import (
    finish_step,
    per_token_loss,
    step_loss,
    val_metrics,
    val_sums,
)

DEFAULT_DATA = "tinyrecipe.data.datamodule.MixedStreamingDataModule"
FSDP2_NAMES = ("fsdp2", "FSDP2Strategy", "ModelParallelStrategy")


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_fsdp2(spec: Any) -> bool:
    name = spec.get("class_path", "") if isinstance(spec, dict) else str(spec)
    return name.rpartition(".")[2] in FSDP2_NAMES


def _strategy(spec: Any, module: CausalLMModule, precision: str):
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

    def parallelize_fn(m: CausalLMModule, mesh) -> CausalLMModule:
        cuda = mesh.device_type == "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        dp = mesh["data_parallel"]
        m.model = m.build_model(
            mesh=hsdp_mesh(mesh.device_type, dp.size(), shard_group_size) or dp,
            bf16="bf16" in precision,
            device=device,
            reshard_after_forward=reshard_after_forward,
        )
        return m

    class FSDP2(ModelParallelStrategy):
        def setup_environment(self) -> None:
            shard_over_every_rank(self)  # as FSDP2Strategy does
            super().setup_environment()

    strategy = FSDP2(parallelize_fn=parallelize_fn, **args)
    strategy.reshard_after_backward = reshard_after_backward  # read by the accumulation loop
    return strategy


def _save(fabric: L.Fabric, directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    """`directory/step=<step>.ckpt`, written into a temporary sibling every rank agrees on and
    renamed into place by rank 0 once all have written, then `last.ckpt` pointed at it in one
    atomic link swap (as the Trainer path does), then all but the newest `keep` step checkpoints
    deleted: a kill at any moment leaves `last.ckpt` naming a whole checkpoint."""
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
    return path


def _load(fabric: L.Fabric, path: str, state: dict, config) -> dict:
    """fabric.load, after refusing in one line a missing path, a sharded checkpoint for a
    one-file strategy and another model shape; then each stateful object (schedule, data
    position, spike window) restored from its saved dict: Lightning's ModelParallelStrategy
    (FSDP2) puts the dict in its place instead (lightning 2.6), so an FSDP2 resume restarted
    the schedule and the data."""
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
                sums[i] += val_sums(model, batch)
    model.train()
    totals = fabric.all_reduce(sums, reduce_op="sum").tolist()
    return val_metrics([(n, w, *t) for (n, w), t in zip(sources, totals, strict=True)])


def _downstream(fabric: L.Fabric, module: CausalLMModule, spec: dict, step: int) -> None:
    """The recipe's downstream_eval (the Trainer's DownstreamEval) in this loop."""
    from tinyrecipe.interop.evaluate import downstream_metrics

    options = {
        k: v for k, v in spec.items() if k not in ("tasks", "tokenizer_dir", "every_n_steps")
    }
    metrics = downstream_metrics(
        module.model,
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
    t, m = recipe.get("trainer") or {}, dict(recipe.get("model") or {})
    refuse_fsdp1(t.get("strategy"))
    data_spec = dict(recipe.get("data") or {})
    data_class = _import(data_spec.pop("class_path", DEFAULT_DATA))
    if not issubclass(data_class, StreamPosition):  # a rank-aware stream with a position
        raise ValueError(
            f"tinyrecipe fabric trains on a DataModule that streams with a position "
            f"(tinyrecipe.data.position.StreamPosition); {data_class.__name__} does not"
        )
    data_args = dict(data_spec.pop("init_args", {}), **data_spec)
    root = Path(t.get("default_root_dir") or "out")
    precision = str(t.get("precision") or "32-true")
    spec = t.get("strategy") or "auto"

    module = CausalLMModule(**m)
    from lightning.fabric.loggers import TensorBoardLogger

    strategy = _strategy(spec, module, precision)
    fabric = L.Fabric(
        accelerator=t.get("accelerator") or "auto",
        devices=t.get("devices") or "auto",
        num_nodes=t.get("num_nodes") or 1,
        strategy=strategy,
        precision=precision,
        loggers=TensorBoardLogger(root_dir=root, name="fabric", version=0),
    )
    fabric.launch()
    fabric.seed_everything(recipe.get("seed_everything") or 0)
    data = data_class(**data_args, vocab_size=module.config.vocab_size)
    if not _is_fsdp2(spec):
        module.model = module.build_model(device=fabric.device)
    model = fabric.setup(module)
    max_steps = int(t.get("max_steps") or -1)
    optimizer, scheduler = module.build_optimizer(max_steps)
    optimizer = fabric.setup_optimizers(optimizer)
    fabric.print(describe(module, precision, fabric.device))

    data.setup("fit")
    accumulate = int(t.get("accumulate_grad_batches") or 1)
    reshard_after_backward = getattr(strategy, "reshard_after_backward", True)
    if hasattr(data, "set_rank_world"):
        data.set_rank_world(fabric.global_rank, fabric.world_size, accumulate, fabric.device)
    state = {
        "state_dict": model,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "datamodule": data,
        "hyper_parameters": dict(module.hparams),
        "global_step": 0,
    }
    if module.spikes is not None:
        state["spike_skipper"] = module.spikes
    step = 0
    if resume:
        remainder = _load(fabric, resume, state, module.config)
        step = state["global_step"] = int(remainder.get("global_step", state["global_step"]))
        set_scheduled_lr(scheduler)  # this recipe's schedule from the resumed step on
    train_loader = fabric.setup_dataloaders(data.train_dataloader(), use_distributed_sampler=False)
    val = data.val_dataloader() or []
    val_loaders = [
        fabric.setup_dataloaders(v) for v in ([val] if isinstance(val, DataLoader) else val)
    ]
    sources = data.val_sources() if hasattr(data, "val_sources") else []

    clip = t.get("gradient_clip_val")
    every = int(t.get("val_check_interval") or 0) // accumulate  # micro-batches -> steps
    log_every = int(t.get("log_every_n_steps") or 50)
    save_every = int((recipe.get("checkpoint") or {}).get("every_n_train_steps") or 0)
    top_k = (recipe.get("checkpoint") or {}).get("save_top_k")
    # step checkpoints kept: Lightning's default 2; -1 all (0 in _save); `last` needs at least one
    keep = 2 if top_k is None else (0 if int(top_k) < 0 else max(int(top_k), 1))
    peak, _ = device_peak(fabric.device, precision)
    params = [p for p in module.model.parameters()]
    fabric.print(f"tinyrecipe fabric: {fabric.world_size} process(es), {precision}, {root}")
    if val_loaders and t.get("num_sanity_val_steps") == -1 and step == 0:
        fabric.log_dict(evaluate(fabric, model, val_loaders, sources), step=0)
    downstream = dict(recipe.get("downstream_eval") or {})
    if downstream.get("tasks"):
        every_eval = DownstreamEval(**downstream).every_n_steps  # its defaults and checks
        downstream["tokenizer_dir"] = downstream.get("tokenizer_dir") or getattr(
            data, "tokenizer_dir", None
        )
        if downstream.pop("at_start", False) and step == 0:
            _downstream(fabric, module, downstream, 0)

    losses: list[float] = []
    window: list[torch.Tensor] = []  # this logging window's step losses, still on the device
    per_token = per_token_loss(data)
    spikes = torch.zeros((), device=fabric.device)
    batches = iter(train_loader)
    start, start_step, tokens_per_step = time.perf_counter(), step, 0
    position = data.state_dict().get("samples_consumed") if hasattr(data, "state_dict") else None
    tokens_before = position * data.block_size if position is not None else None
    while step < max_steps:
        loss_sum = z_sum = tokens = None
        for micro in range(accumulate):
            batch = next(batches, None)
            if batch is None:  # an epoch of SFT rows ended: the next one starts
                batches = iter(train_loader)
                batch = next(batches)
            not_last = micro < accumulate - 1
            with (
                fabric.no_backward_sync(model, enabled=not_last),
                keep_gathered(module.model, enabled=not_last and not reshard_after_backward),
            ):
                loss, z, n = step_loss(model, batch, per_token)
                if n is not None:
                    tokens = n if tokens is None else tokens + n
                fabric.backward(loss / accumulate)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if z is not None:
                z_sum = z if z_sum is None else z_sum + z
            tokens_per_step = batch["labels"].numel() * accumulate * fabric.world_size
        stats = finish_step(
            params,
            loss_sum,
            accumulate,
            max_norm=clip,
            optimizer=optimizer.optimizer,
            z_sum=z_sum,
            spikes=module.spikes,
            tokens=tokens,
        )
        spikes = spikes + stats.spike if stats.spike is not None else spikes
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        module.guard.record(stats, step)
        step += 1
        window.append(stats.loss)
        if step % log_every == 0 or step == max_steps:
            losses += torch.stack(window).tolist()  # one read per logging window
            window.clear()
            tokens_per_sec = tokens_per_step * (step - start_step) / (time.perf_counter() - start)
            flops_per_sec = tokens_per_sec * module.train_flops_per_token(batch["labels"].size(1))
            metrics = {
                "train/loss": losses[-1],
                "train/grad_norm": stats.grad_norm.item(),
                "lr": scheduler.get_last_lr()[0],
                "train/tokens_seen": float(
                    (start_step * tokens_per_step if tokens_before is None else tokens_before)
                    + (step - start_step) * tokens_per_step
                ),
                "train/tokens_per_sec": tokens_per_sec,
                "train/skipped_steps": float(module.guard.skipped),
            }
            if module.spikes is not None:
                metrics["train/spike_skips"] = spikes.item()
            if stats.z_loss is not None:
                metrics["train/z_loss"] = stats.z_loss.item()
            if peak:
                metrics["train/mfu"] = flops_per_sec / fabric.world_size / peak
            fabric.log_dict(metrics, step=step)
            fabric.print(f"step {step}: loss {metrics['train/loss']:.4f}")
        if val_loaders and every and (step % every == 0 or step == max_steps):
            fabric.log_dict(evaluate(fabric, model, val_loaders, sources), step=step)
        if downstream.get("tasks") and (
            (every_eval and step % every_eval == 0) or step == max_steps
        ):  # the final weights are always scored, as in `fit`
            _downstream(fabric, module, downstream, step)
        if save_every and step % save_every == 0 and step < max_steps:
            state["global_step"] = step
            _save(fabric, root / "fabric", step, state, keep)
    module.guard.flush()
    state["global_step"] = step
    _save(fabric, root / "fabric", step, state, keep)
    fabric.print(f"checkpoint: {root / 'fabric' / 'last.ckpt'}")
    return losses

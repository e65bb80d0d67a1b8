"""`tinyrecipe fabric --config recipes/X.yaml`: the same training as `tinyrecipe fit`, written out
as one loop on Lightning Fabric (TinyLlama's own trainer is such a loop), for researchers who
want to own it or run it from a notebook.

Everything but the loop is shared with the Trainer path: the recipe file (trainer.accelerator,
devices, num_nodes, strategy, precision, max_steps, accumulate_grad_batches, gradient_clip_val,
val_check_interval, default_root_dir; model.*; data.*), `CausalLMModule` (the decoder, AdamW and
the LR schedule via `build_optimizer`), the DataModules, the validation summary (`val_metrics`),
the FLOPs formula and the checkpoint layout (`state_dict` with `model.` keys + hyper_parameters,
so `generate`, `convert` and `init_from` read Fabric checkpoints too). On the same seed and data
its loss sequence equals the Trainer's (tested, fp32 CPU).

    tinyrecipe fabric --config recipes/quickstart.yaml trainer.max_steps=50
    tinyrecipe fabric --config recipes/quickstart.yaml --resume out/quickstart/fabric/last.ckpt

From Python: `losses = tinyrecipe.fabric.train(recipe_dict)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tinyrecipe.modules import CausalLMModule, val_metrics, val_sums
from tinyrecipe.recipe import DEFAULT_DATA, load_recipe


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _strategy(spec: Any, precision: str):
    """The recipe's (Trainer) strategy as a Fabric strategy. FSDP2 shards as the Trainer does."""
    if not isinstance(spec, dict):
        return spec  # "auto", "ddp", "fsdp", ...
    name, init_args = spec["class_path"].rpartition(".")[2], dict(spec.get("init_args") or {})
    if name == "ModelParallelStrategy":
        from lightning.fabric.strategies import ModelParallelStrategy

        from tinyrecipe.strategies import apply_fsdp2, bf16_mixed_policy

        def parallelize(m: CausalLMModule, mesh) -> CausalLMModule:
            policy = bf16_mixed_policy() if "bf16" in precision else None
            apply_fsdp2(m.model, mesh["data_parallel"], mp_policy=policy)
            return m

        return ModelParallelStrategy(parallelize_fn=parallelize, **init_args)
    return getattr(importlib.import_module("lightning.fabric.strategies"), name)(**init_args)


def _atomic_save(fabric: L.Fabric, path: Path, state: dict) -> None:
    """fabric.save to a temp name, then rename: a killed save never replaces a good `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    fabric.save(tmp, state)
    fabric.barrier()
    if fabric.global_rank == 0:
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    fabric.barrier()


def evaluate(fabric: L.Fabric, model, loaders: list, sources: list[tuple[str, float]]) -> dict:
    """val/loss[/<source>] and val/ppl[/<source>], every rank taking part in every reduction."""
    rows = []
    model.eval()
    with torch.no_grad():
        for (name, weight), loader in zip(sources, loaders, strict=True):
            sums = torch.zeros(2, device=fabric.device)
            for batch in loader:
                sums += val_sums(model, *CausalLMModule.inputs_and_targets(batch))
            sums = fabric.all_reduce(sums, reduce_op="sum")
            rows.append((name, weight, sums[0].item(), sums[1].item()))
    model.train()
    return val_metrics(rows)


def train(recipe: dict, resume: str | None = None) -> list[float]:
    """Train `recipe` (a parsed recipe dict); returns the training loss of every optimizer step
    (mean over ranks, last micro-batch, as the Trainer logs it)."""
    t, m = recipe.get("trainer") or {}, dict(recipe.get("model") or {})
    data_spec = dict(recipe.get("data") or {})
    data_class = _import(data_spec.pop("class_path", DEFAULT_DATA))
    data_args = dict(data_spec.pop("init_args", {}), **data_spec)
    root = Path(t.get("default_root_dir", "out"))
    precision = str(t.get("precision", "32-true"))

    module = CausalLMModule(**m)
    from lightning.fabric.loggers import TensorBoardLogger

    fabric = L.Fabric(
        accelerator=t.get("accelerator", "auto"),
        devices=t.get("devices", "auto"),
        num_nodes=t.get("num_nodes", 1),
        strategy=_strategy(t.get("strategy", "auto"), precision),
        precision=precision,
        loggers=TensorBoardLogger(root_dir=root, name="fabric", version=0),
    )
    fabric.launch()
    fabric.seed_everything(recipe.get("seed_everything", 0))
    data = data_class(**data_args, vocab_size=module.config.vocab_size)
    module.configure_model()
    model = fabric.setup(module)
    max_steps = int(t.get("max_steps", -1))
    optimizer, scheduler = module.build_optimizer(max_steps)
    optimizer = fabric.setup_optimizers(optimizer)

    data.setup("fit")
    if hasattr(data, "set_rank_world"):
        data.set_rank_world(fabric.global_rank, fabric.world_size)
    step = 0
    state = {
        "state_dict": model,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "datamodule": data,
        "hyper_parameters": dict(module.hparams),
        "global_step": 0,
    }
    if resume:
        remainder = fabric.load(resume, state)
        step = state["global_step"] = int(remainder.get("global_step", state["global_step"]))
    train_loader = fabric.setup_dataloaders(data.train_dataloader(), use_distributed_sampler=False)
    val_loaders = data.val_dataloader()
    val_loaders = [fabric.setup_dataloaders(v) for v in (val_loaders or [])]
    sources = data.val_sources() if hasattr(data, "val_sources") else []

    accumulate = int(t.get("accumulate_grad_batches", 1))
    clip = t.get("gradient_clip_val")
    every = int(t.get("val_check_interval") or 0) // accumulate  # micro-batches -> steps
    log_every = int(t.get("log_every_n_steps", 50))
    tokens_per_step = 0
    fabric.print(f"tinyrecipe fabric: {fabric.world_size} process(es), {precision}, {root}")
    if val_loaders and t.get("num_sanity_val_steps") == -1 and step == 0:
        fabric.log_dict(evaluate(fabric, model, val_loaders, sources), step=0)

    losses: list[float] = []
    batches = iter(train_loader)
    start = time.perf_counter()
    while step < max_steps:
        for micro in range(accumulate):
            batch = next(batches)
            inputs, targets = CausalLMModule.inputs_and_targets(batch)
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                _, loss = model(inputs, targets)
                fabric.backward(loss / accumulate)
            tokens_per_step = targets.numel() * accumulate * fabric.world_size
        if clip:
            fabric.clip_gradients(model, optimizer, max_norm=float(clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        losses.append(fabric.all_reduce(loss.detach(), reduce_op="mean").item())
        if step % log_every == 0 or step == max_steps:
            elapsed = time.perf_counter() - start
            fabric.log_dict(
                {
                    "train/loss": losses[-1],
                    "lr": scheduler.get_last_lr()[0],
                    "train/tokens_seen": float(step * tokens_per_step),
                    "throughput/tokens_per_sec": tokens_per_step * len(losses) / elapsed,
                },
                step=step,
            )
            fabric.print(f"step {step}: loss {losses[-1]:.4f}")
        if val_loaders and every and (step % every == 0 or step == max_steps):
            fabric.log_dict(evaluate(fabric, model, val_loaders, sources), step=step)
    state["global_step"] = step
    (root / "fabric").mkdir(parents=True, exist_ok=True)
    _atomic_save(fabric, root / "fabric" / "last.ckpt", state)
    fabric.print(f"checkpoint: {root / 'fabric' / 'last.ckpt'}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyrecipe fabric", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="recipe (repeatable)")
    parser.add_argument("--resume", help="a checkpoint this loop wrote (e.g. .../fabric/last.ckpt)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. trainer.max_steps=50")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    try:
        train(load_recipe(args.config, args.overrides), resume=args.resume)
    except (ValueError, FileNotFoundError, TypeError) as err:
        if os.environ.get("TINYRECIPE_DEBUG"):
            raise
        print(f"tinyrecipe fabric: error: {err}", file=sys.stderr)
        return 2
    return 0

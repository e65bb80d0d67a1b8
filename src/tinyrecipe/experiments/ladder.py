"""A ladder of model sizes at several token budgets, as overlays on one base recipe: the runs a
scaling-law fit needs (`tinyrecipe ladder`, then `tinyrecipe sweep`, `compare`, `fit-law`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tinyrecipe.io import atomic_write
from tinyrecipe.model.config import PRESETS, ModelConfig, resolve_config

SHAPE = re.compile(r"^d(\d+)-l(\d+)$")


def size_fields(size: str) -> dict:
    """The model keys of one rung: a preset name (`llama-60m`) or a shape `d<width>-l<depth>`
    (TinyLlama's shape rules; heads of 16 below width 256, of 64 above)."""
    if size in PRESETS:
        return {"preset": size}
    match = SHAPE.match(size)
    if not match:
        raise ValueError(
            f"ladder size {size!r} is neither a preset ({', '.join(PRESETS)}) nor a shape like d64-l2"
        )
    d, n = int(match[1]), int(match[2])
    small = d < 256
    shape = ModelConfig.from_shape(
        d,
        n,
        head_dim=16 if small else 64,
        kv_ratio=2 if small else 8,
        ffn_multiple=16 if small else 256,
    )
    keys = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")
    return {"config": {k: getattr(shape, k) for k in keys}}


@dataclass
class Rung:
    size: str
    tokens_per_param: float
    n_params: int
    max_steps: int
    tokens: float

    @property
    def name(self) -> str:
        return f"{self.size}-{self.tokens_per_param:g}x"


def ladder(
    recipe: dict,
    sizes: list[str],
    tokens_per_param: list[float],
) -> list[Rung]:
    """The rungs for a parsed base recipe (its vocabulary, block and tokens per step)."""
    model, data, trainer = recipe["model"], recipe["data"]["init_args"], recipe["trainer"]
    world = int(trainer.get("devices") or 1) if str(trainer.get("devices")).isdigit() else 1
    world *= int(trainer.get("num_nodes") or 1)
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    per_step = int(data["batch_size"]) * world * accumulate * int(data["block_size"])
    if recipe.get("global_batch_size"):
        per_step = int(recipe["global_batch_size"]) * int(data["block_size"])
    rungs = []
    for size in sizes:
        fields = size_fields(size)
        config = dict(model.get("config") or {}, **fields.get("config", {}))
        n_params = resolve_config(fields.get("preset", model["preset"]), config).num_params()
        for tpp in tokens_per_param:
            steps = max(1, math.ceil(tpp * n_params / per_step))
            rungs.append(Rung(size, tpp, n_params, steps, steps * per_step))
    return rungs


def write_ladder(
    recipe: dict, rungs: list[Rung], out: str | Path, command: str, evals: int = 8
) -> list[Path]:
    """One overlay per rung in `out` (`<size>-<budget>x.yaml`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accumulate = int(recipe["trainer"].get("accumulate_grad_batches") or 1)
    warmup = int((recipe["model"].get("schedule") or {}).get("warmup_steps") or 0)
    paths = []
    for rung in rungs:
        fields = size_fields(rung.size)
        every = max(1, rung.max_steps // evals)
        overlay = {
            "trainer": {
                "max_steps": rung.max_steps,
                "val_check_interval": every * accumulate,  # micro-batches
            },
            "checkpoint": {"every_n_train_steps": every},  # an interrupted rung resumes
            "model": {
                **fields,
                "schedule": {"warmup_steps": min(warmup, max(1, rung.max_steps // 10))},
            },
        }
        head = (
            f"# {rung.name}: {rung.n_params:,} parameters x {rung.tokens_per_param:g} tokens each "
            f"= {rung.tokens:.3g} tokens in {rung.max_steps:,} steps.\n# Written by: {command}\n"
        )
        path = out / f"{rung.name}.yaml"
        atomic_write(path, head + yaml.safe_dump(overlay, sort_keys=False))
        paths.append(path)
    return paths

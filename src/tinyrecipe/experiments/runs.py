"""A run directory read back: its resolved recipe (`tensorboard/config.yaml`, written by
`tinyrecipe fit`) and its TensorBoard scalars, and what follows from them (parameters, tokens,
training FLOPs, validation curves)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

SEED = re.compile(r"-seed(\d+)$")


@dataclass
class Run:
    """One training run: `path` is its `trainer.default_root_dir`."""

    path: Path
    recipe: dict = field(default_factory=dict)
    # tag -> [(step, value, wall time)], the latest value of a step (a resumed run logs again)
    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def group(self) -> str:
        """The name without its `-seed<N>` suffix: the runs a seed band joins."""
        return SEED.sub("", self.name)

    def curve(self, tag: str) -> list[tuple[int, float]]:
        return [(step, value) for step, value, _ in self.scalars.get(tag, [])]

    def last(self, tag: str) -> float | None:
        values = self.scalars.get(tag)
        return values[-1][1] if values else None

    @cached_property
    def config(self):
        from tinyrecipe.model.config import DEFAULT_PRESET, resolve_config

        model = self.recipe.get("model") or {}
        return resolve_config(model.get("preset") or DEFAULT_PRESET, model.get("config"))

    @property
    def n_params(self) -> int:
        return self.config.num_params()

    @property
    def seq_len(self) -> int:
        data = (self.recipe.get("data") or {}).get("init_args") or self.recipe.get("data") or {}
        return int(data.get("block_size") or self.config.block_size)

    def tokens_at(self, step: int) -> float:
        """Training tokens consumed after `step` optimizer steps (from train/tokens_seen, which
        the step with index s logs as the total after s + 1 steps)."""
        seen = self.curve("train/tokens_seen")
        if not seen:
            return math.nan
        x = np.array([0.0] + [s + 1 for s, _ in seen])
        y = np.array([0.0] + [v for _, v in seen])
        if step > x[-1]:  # past the last log: at the last rate
            return float(y[-1] + (step - x[-1]) * (y[-1] - y[-2]) / max(x[-1] - x[-2], 1))
        return float(np.interp(step, x, y))

    def tokens_behind(self, step: int) -> float:
        """Training tokens behind a validation logged at `step`: the Trainer logs the one after
        k optimizer steps at step k - 1 (the step index, as that step's training metrics); the
        Fabric loop logs it and train/tokens_seen at k, which reads the same."""
        return self.tokens_at(step + 1)

    @property
    def flops_per_token(self) -> float:
        from tinyrecipe.planning.flops import train_flops_per_token

        return train_flops_per_token(self.config, self.seq_len)

    def flops_at(self, step: int) -> float:
        return self.tokens_at(step) * self.flops_per_token

    @property
    def steps(self) -> int:
        losses = self.curve("train/loss")
        return losses[-1][0] + 1 if losses else 0

    @property
    def wall_seconds(self) -> float:
        times = [t for values in self.scalars.values() for _, _, t in values]
        return max(times) - min(times) if times else math.nan

    def median(self, tag: str) -> float | None:
        values = [v for _, v, _ in self.scalars.get(tag, [])]
        return float(np.median(values)) if values else None


def read_run(path: str | Path) -> Run:
    """The run at `path` (a `trainer.default_root_dir`); refused in one line when it holds no
    TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    events = sorted(path.rglob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(
            f"run directory '{path}' holds no TensorBoard events; give the trainer.default_root_dir "
            "of a tinyrecipe fit run"
        )
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for f in sorted(events, key=lambda p: p.stat().st_mtime):  # later files win a step
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            bucket = merged.setdefault(tag, {})
            for e in acc.Scalars(tag):
                bucket[e.step] = (e.value, e.wall_time)
    scalars = {
        tag: [(step, value, wall) for step, (value, wall) in sorted(bucket.items())]
        for tag, bucket in merged.items()
    }
    configs = sorted(path.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    recipe = yaml.safe_load(configs[-1].read_text()) if configs else {}
    return Run(path, recipe or {}, scalars)


def loss_points(
    runs: list[Run], tag: str = "val/loss", final_only: bool = False
) -> tuple[list[tuple[float, float, float]], list[str]]:
    """(parameters, tokens, loss) along each run's validation curve (the untrained step-0 point
    left out), and the run each point came from: what `fit-law` fits."""
    points, names = [], []
    for run in runs:
        curve = [(s, v) for s, v in run.curve(tag) if s > 0 and math.isfinite(v)]
        for step, value in curve[-1:] if final_only else curve:
            tokens = run.tokens_behind(step)
            if tokens > 0:
                points.append((float(run.n_params), tokens, value))
                names.append(run.name)
    return points, names

"""Fitting L(N, D) = E + A/N^alpha + B/D^beta to your own runs (Hoffmann et al. 2022, approach 3).

Each point is (parameters N, training tokens D, validation loss L). The fit minimises the Huber
loss (delta 1e-3) of

    r = LSE(a - alpha log N, b - beta log D, e) - log L,      A = e^a, B = e^b, E = e^e

with L-BFGS. Hoffmann et al. start L-BFGS from every point of a grid over (a, b, e, alpha, beta)
and keep the best; here the objective is evaluated on that grid at once and L-BFGS starts from
the best `starts` grid points (the rest never win on these small fits; `starts` raises it).
Bootstrap intervals refit resampled runs (whole curves, so the points of one run stay
together), each from the full fit's optimum (a constant the points do not pin down can then
read a narrower interval than a search of its own would give).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tinyrecipe.io import atomic_write
from tinyrecipe.planning.scaling import LossFit

DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")
# L-BFGS-B's box for (a, b, e, alpha, beta): wide enough for any real law (Chinchilla: a 6.0,
# b 6.0, e 0.53, alpha 0.34, beta 0.28), and it keeps exp() finite when the points cannot
# identify a constant (then the bootstrap interval runs to the box's edge: read it as unknown).
BOUNDS = [(-20.0, 60.0), (-20.0, 60.0), (-20.0, 5.0), (0.0, 5.0), (0.0, 5.0)]
GRID = {
    "a": np.linspace(0.0, 25.0, 6),
    "b": np.linspace(0.0, 25.0, 6),
    "e": np.linspace(-1.0, 1.0, 5),
    "alpha": np.linspace(0.0, 2.0, 5),
    "beta": np.linspace(0.0, 2.0, 5),
}


@dataclass
class LawFit:
    """A fitted law, its bootstrap intervals and the points it came from (what law.json holds)."""

    law: LossFit
    intervals: dict[str, tuple[float, float]]  # 95% bootstrap interval of each constant
    points: list[tuple[float, float, float]]  # (N, D, L)
    runs: list[str] = field(default_factory=list)  # the run each point came from
    huber: float = 0.0  # the objective at the optimum

    def save(self, path: str | Path) -> None:
        def finite(x: float) -> float | None:  # JSON has no NaN: an interval not fitted is null
            return x if math.isfinite(x) else None

        payload = {
            "law": asdict(self.law),
            "intervals": {k: [finite(lo), finite(hi)] for k, (lo, hi) in self.intervals.items()},
            "points": self.points,
            "runs": self.runs,
            "huber": finite(self.huber),
            "form": "L(N, D) = E + A / N^alpha + B / D^beta; N parameters, D training tokens",
        }
        atomic_write(Path(path), json.dumps(payload, indent=1, allow_nan=False))


def load_law(path: str | Path) -> LossFit:
    """The LossFit of a `tinyrecipe fit-law` output (law.json)."""
    try:
        law = json.loads(Path(path).read_text())["law"]
        return LossFit(**{k: float(law[k]) for k in PARAMS})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"'{path}' is not a law from `tinyrecipe fit-law` ({type(err).__name__}: {err}); "
            "write it with tinyrecipe fit-law RUN_DIR... --out law.json"
        ) from None


def fitted_sizes(path: str | Path) -> tuple[float, float] | None:
    """The smallest and largest parameter count among a law.json's points (None without)."""
    points = json.loads(Path(path).read_text()).get("points") or []
    return (min(p[0] for p in points), max(p[0] for p in points)) if points else None


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """Summed Huber loss and its gradient; theta = (a, b, e, alpha, beta), rows of a batch allowed."""
    theta = np.atleast_2d(theta)
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))  # (k, 1) each
    shape = (len(theta), len(log_n))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, shape)], -1)
    top = terms.max(-1, keepdims=True)
    weights = np.exp(terms - top)
    total = weights.sum(-1, keepdims=True)
    lse = (top + np.log(total))[..., 0]
    r = lse - log_l
    small = np.abs(r) <= DELTA
    loss = np.where(small, 0.5 * r**2, DELTA * (np.abs(r) - 0.5 * DELTA)).sum(-1)
    dr = np.where(small, r, DELTA * np.sign(r))  # d huber / d r
    soft = weights / total
    grad = np.stack(
        [
            (dr * soft[..., 0]).sum(-1),
            (dr * soft[..., 1]).sum(-1),
            (dr * soft[..., 2]).sum(-1),
            -(dr * soft[..., 0] * log_n).sum(-1),
            -(dr * soft[..., 1] * log_d).sum(-1),
        ],
        -1,
    )
    return loss, grad


def _grid() -> np.ndarray:
    mesh = np.meshgrid(*GRID.values(), indexing="ij")
    return np.stack([m.ravel() for m in mesh], -1)


def _minimise(points: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    log_n, log_d, log_l = (np.log(points[:, i]) for i in range(3))
    best, best_loss = None, np.inf
    for start in starts:
        result = minimize(
            lambda t: tuple(v[0] for v in _objective(t, log_n, log_d, log_l)),
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=BOUNDS,
            options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15},
        )
        if result.fun < best_loss:
            best, best_loss = result.x, float(result.fun)
    return best, best_loss


def _best_grid_points(points: np.ndarray, k: int) -> np.ndarray:
    log_n, log_d, log_l = (np.log(points[:, i]) for i in range(3))
    grid = _grid()
    losses = np.concatenate(
        [_objective(chunk, log_n, log_d, log_l)[0] for chunk in np.array_split(grid, 20)]
    )
    return grid[np.argsort(losses)[:k]]


def _as_law(theta: np.ndarray) -> LossFit:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return LossFit(
        E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta
    )


def fit_law(
    points: list[tuple[float, float, float]],
    runs: list[str] | None = None,
    starts: int = 16,
    bootstrap: int = 100,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> LawFit:
    """Fit L(N, D) to (N, D, L) points; `runs` names the run of each point (bootstrap resamples
    runs, or points when there are none; each resample refits from the full fit's optimum).
    `progress(done, total, seconds)` is called after each resample."""
    data = np.asarray(points, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 3 or len(data) < 5:
        raise ValueError(
            f"fit-law needs at least 5 (parameters, tokens, loss) points, got {len(data)}; add runs "
            "or validate more often (trainer.val_check_interval)"
        )
    if (data <= 0).any():
        raise ValueError("fit-law points must have positive parameters, tokens and loss")
    runs = list(runs) if runs is not None else [str(i) for i in range(len(data))]
    grid_starts = _best_grid_points(data, starts)
    theta, huber = _minimise(data, grid_starts)
    rng = np.random.default_rng(seed)
    names = sorted(set(runs))
    members = {name: np.flatnonzero(np.array(runs) == name) for name in names}
    samples = []
    start = time.perf_counter()
    for done in range(1, bootstrap + 1):
        chosen = rng.choice(len(names), len(names), replace=True)
        rows = np.concatenate([members[names[c]] for c in chosen])
        if len({tuple(data[r, :2]) for r in rows}) >= 5:  # else too few to fit five constants
            refit, _ = _minimise(data[rows], theta[None])
            samples.append(asdict(_as_law(refit)))
        if progress is not None:
            progress(done, bootstrap, time.perf_counter() - start)
    intervals = (
        {
            k: (
                float(np.percentile([s[k] for s in samples], 2.5)),
                float(np.percentile([s[k] for s in samples], 97.5)),
            )
            for k in PARAMS
        }
        if samples
        else {k: (float("nan"), float("nan")) for k in PARAMS}
    )
    return LawFit(_as_law(theta), intervals, [tuple(map(float, p)) for p in data], runs, huber)

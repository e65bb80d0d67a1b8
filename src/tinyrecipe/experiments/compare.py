"""Runs against each other: a table (what each recipe changes against the baseline run, tokens,
training FLOPs, validation losses, downstream scores, speed) and plots of validation loss
against tokens and against FLOPs, one line per run, seeds drawn as a band; a markdown report
embeds them. With two or more seeds on both sides, a final loss's difference from the
baseline's is marked "(*)" where Welch's t-test gives p < 0.05, else "(n.s.)"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyrecipe.experiments.runs import Run
from tinyrecipe.io import atomic_path, atomic_write

# Keys that differ between any two runs without being part of the experiment.
IGNORED = (
    "trainer.default_root_dir",
    "checkpoint.dirpath",
    "ckpt_path",
    "seed_everything",
    "config",
    "trainer.logger",
)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for a nested recipe (data's class_path/init_args folded away)."""
    out: dict[str, object] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "init_args":
                out.update(flatten(value, prefix))
            elif key != "class_path" or not prefix.startswith("data"):
                out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def changes(run: Run, reference: Run) -> str:
    """'key=value, ...' of what run's recipe sets differently from the reference's."""
    mine, theirs = flatten(run.recipe), flatten(reference.recipe)
    keys = sorted(
        k
        for k in set(mine) | set(theirs)
        if mine.get(k) != theirs.get(k) and not k.startswith(IGNORED)
    )
    return ", ".join(f"{k}={mine.get(k)}" for k in keys) or "-"


@dataclass
class Group:
    """The seeds of one configuration."""

    name: str
    runs: list[Run]

    def finals(self, tag: str = "val/loss") -> list[float]:
        return [v for v in (r.last(tag) for r in self.runs) if v is not None]

    def mean(self, tag: str = "val/loss") -> float:
        finals = self.finals(tag)
        return float(np.mean(finals)) if finals else math.nan

    def sem(self, tag: str = "val/loss") -> float:
        """Standard error of the mean final value over the seeds (nan with one seed)."""
        finals = self.finals(tag)
        if len(finals) < 2:
            return math.nan
        return float(np.std(finals, ddof=1) / math.sqrt(len(finals)))


def differs(group: Group, baseline: Group, tag: str = "val/loss") -> bool | None:
    """Whether the final values of `group` and `baseline` differ by Welch's t-test (p < 0.05);
    None when either has fewer than two seeds (nothing to tell the seed noise by)."""
    from scipy.stats import ttest_ind

    a, b = group.finals(tag), baseline.finals(tag)
    if min(len(a), len(b)) < 2:
        return None
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no seed noise at all: any difference shows
        return bool(a[0] != b[0])
    return bool(ttest_ind(a, b, equal_var=False).pvalue < 0.05)


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return [Group(name, members) for name, members in groups.items()]


def _fmt(value, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def baseline_first(groups: list[Group], baseline: str | None = None) -> list[Group]:
    """The groups with the baseline first: the one named `baseline`, else one named `base` (a
    sweep's base recipe), else the first given."""
    names = [g.name for g in groups]
    if baseline is not None and baseline not in names:
        raise ValueError(f"--baseline {baseline!r} names no run; the runs are {', '.join(names)}")
    want = baseline or ("base" if "base" in names else names[0])
    return sorted(groups, key=lambda g: g.name != want)


def table(runs: list[Run], baseline: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The comparison table: a header and one row per configuration (seeds averaged), the
    baseline's first (`baseline_first`)."""
    groups = baseline_first(group_runs(runs), baseline)
    first = groups[0]
    sources = sorted({t for r in runs for t in r.scalars if t.startswith("val/loss/")})
    downstream = sorted({t for r in runs for t in r.scalars if t.startswith("eval/")})
    header = [
        "run",
        "seeds",
        "changes vs " + first.name,
        "params",
        "tokens",
        "train FLOPs",
        "final val/loss",
        "best val/loss",
        *[f"final {s}" for s in sources],
        *downstream,
        "tokens/s/device",
        "MFU",
        "wall s",
    ]
    rows = []
    for group in groups:
        run = group.runs[0]
        final = group.mean()
        verdict = differs(group, first) if group is not first else None
        mark = {True: " (*)", False: " (n.s.)", None: ""}[verdict]
        best = [min((v for _, v in r.curve("val/loss")), default=math.nan) for r in group.runs]
        steps = run.steps
        rows.append(
            [
                group.name,
                str(len(group.runs)),
                changes(run, first.runs[0]),
                f"{run.n_params / 1e6:.2f}M",
                _fmt(run.tokens_at(steps), ".3g"),
                _fmt(run.flops_at(steps), ".3g"),
                _fmt(final) + (f" ± {group.sem():.4f}" if len(group.finals()) > 1 else "") + mark,
                _fmt(float(np.mean(best))),
                *[_fmt(group.mean(s)) for s in sources],
                *[_fmt(group.mean(t)) for t in downstream],
                _fmt(run.median("train/device/items_per_sec"), ",.0f"),
                _fmt(run.median("train/device/mfu"), ".1%"),
                _fmt(float(np.mean([r.wall_seconds for r in group.runs])), ".0f"),
            ]
        )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def log_x_axis(ax) -> None:
    """A log x axis labelled at its decades; one spanning less than a decade has no decade tick,
    so its minor ticks (2, 3, 5 x 10^k) keep their labels."""
    import matplotlib.ticker

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    if high >= 10 * low:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot(runs: list[Run], out: Path, tag: str = "val/loss") -> list[Path]:
    """val/loss against tokens and against training FLOPs (log x), one line per configuration;
    several seeds: their mean, with the band between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, label in (("tokens", "training tokens"), ("flops", "training FLOPs")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for group in group_runs(runs):
            curves = []
            for run in group.runs:
                points = [(s, v) for s, v in run.curve(tag) if s > 0]
                x = np.array([run.tokens_behind(s) for s, _ in points])
                if axis == "flops":
                    x = x * run.flops_per_token
                curves.append((x, np.array([v for _, v in points])))
            if not curves or not len(curves[0][0]):
                continue
            x = curves[0][0]
            ys = np.array([np.interp(x, cx, cy) for cx, cy in curves])
            (line,) = ax.plot(x, ys.mean(0), marker=".", label=f"{group.name} ({len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        log_x_axis(ax)
        ax.set_xlabel(label)
        ax.set_ylabel(tag)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{tag.replace('/', '_')}_vs_{axis}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def report(runs: list[Run], out: str | Path, baseline: str | None = None) -> tuple[str, list[Path]]:
    """Write `out/report.md` (the table and the plots) and the PNGs; returns (table text,
    written files)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs, baseline)
    text = markdown_table(header, rows)
    images = plot(runs, out)
    body = [
        "# Comparison",
        "",
        f"Runs: {', '.join(str(r.path) for r in runs)}",
        "",
        text,
        "",
        "`(*)`: the final validation loss differs from the baseline's (first row's) by Welch's "
        "t-test, p < 0.05 (two or more seeds each); `(n.s.)`: not. `±`: the standard error of "
        "the mean over the seeds.",
        "",
        *[f"![{p.stem}]({p.name})\n" for p in images],
    ]
    atomic_write(out / "report.md", "\n".join(body))
    return text, [out / "report.md", *images]

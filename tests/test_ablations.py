"""Ablations and scaling laws: the law fit recovers known constants, compare marks what seeds
cannot tell apart, and the CPU mini-ladder runs end to end: ladder -> sweep -> compare ->
fit-law -> plan --law."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, tinyrecipe
from tinyrecipe.planning.lawfit import fit_law, load_law
from tinyrecipe.planning.scaling import CHINCHILLA, LossFit

SIZES = [2e6, 5e6, 1e7, 3e7, 1e8, 3e8]


def law_points(law: LossFit, noise: float, seed: int = 0):
    """Ten token counts per model size, 1e8 to 3e10, losses times exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    points, runs = [], []
    for n in SIZES:
        for d in np.geomspace(1e8, 3e10, 10):
            points.append((n, d, law.loss(n, d) * np.exp(rng.normal(0.0, noise))))
            runs.append(f"{n:g}")
    return points, runs


@pytest.mark.fast
def test_law_fit_recovers_chinchillas_constants_from_exact_points():
    points, runs = law_points(CHINCHILLA, noise=0.0)
    fit = fit_law(points, runs, bootstrap=0)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, key) == pytest.approx(getattr(CHINCHILLA, key), rel=1e-4), key


def test_law_json_is_json_without_intervals_and_the_fit_reports_progress(tmp_path):
    """--bootstrap 0 writes null intervals (JSON has no NaN); each resample reports progress."""
    points, runs = law_points(CHINCHILLA, noise=0.0)
    fit_law(points, runs, bootstrap=0).save(tmp_path / "law.json")
    text = (tmp_path / "law.json").read_text()
    law = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in law.json"))
    assert law["intervals"]["E"] == [None, None]
    assert load_law(tmp_path / "law.json").E == pytest.approx(CHINCHILLA.E, rel=1e-4)
    seen = []
    fit_law(points, runs, bootstrap=3, progress=lambda done, total, s: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.fast
def test_law_fit_recovers_a_known_law_from_noisy_points_within_its_intervals(tmp_path):
    """0.5% log-normal noise on 60 points (6 sizes): the constants come back within the 95%
    bootstrap intervals, and the exponents within 0.03 (the intervals' half-width is ~0.05 for
    alpha and ~0.01 for beta at this noise, so 0.03 is about one interval half-width)."""
    true = LossFit(E=2.0, A=300.0, B=800.0, alpha=0.35, beta=0.30)
    points, runs = law_points(true, noise=0.005)
    fit = fit_law(points, runs, bootstrap=40)
    for key in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fit.intervals[key]
        assert lo <= getattr(true, key) <= hi, (key, lo, hi)
    assert abs(fit.law.alpha - 0.35) < 0.03 and abs(fit.law.beta - 0.30) < 0.03
    assert abs(fit.law.E - 2.0) < 0.1
    fit.save(tmp_path / "law.json")
    assert load_law(tmp_path / "law.json") == fit.law
    with pytest.raises(ValueError, match="needs at least 5"):
        fit_law(points[:3])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a law from `tinyrecipe fit-law`"):
        load_law(tmp_path / "bad.json")


def fake_run(path, losses: list[float], lr: float, tokens_per_step: int = 1000):
    """A run directory as `tinyrecipe fit` leaves it: TensorBoard scalars and config.yaml."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(path / "tensorboard"))
    for step in range(40):
        writer.add_scalar("train/loss", 5.0, step)
        writer.add_scalar("train/tokens_seen", (step + 1) * tokens_per_step, step)
    for k, loss in enumerate(losses):  # after 10(k + 1) steps, at that step's index
        writer.add_scalar("val/loss", loss, 10 * (k + 1) - 1)
    writer.close()
    recipe = {
        "trainer": {"default_root_dir": str(path), "max_steps": 40},
        "model": {"preset": "tiny", "config": {"n_layer": 2}, "optimizer": {"lr": lr}},
        "data": {"class_path": "x", "init_args": {"block_size": 64, "seed": 1}},
    }
    (path / "tensorboard/config.yaml").write_text(json.dumps(recipe))


@pytest.mark.fast
def test_compare_tables_plots_and_marks_what_the_seeds_cannot_tell_apart(tmp_path):
    from tinyrecipe.experiments.compare import report
    from tinyrecipe.experiments.runs import read_run

    finals = {  # base: 3.05 ± 0.03 over 3 seeds; close: the same mean; far: 0.54 lower
        "close": ([3.5, 3.02], [3.6, 3.08], [3.5, 3.05]),
        "far": ([3.5, 2.50], [3.6, 2.52], [3.5, 2.51]),
        "base": ([3.5, 3.00], [3.6, 3.10], [3.5, 3.05]),
    }
    runs = []
    for name, curves in finals.items():
        for seed, losses in enumerate(curves, 1):
            fake_run(tmp_path / f"{name}-seed{seed}", losses, lr=1e-3 if name == "base" else 2e-3)
            runs.append(read_run(tmp_path / f"{name}-seed{seed}"))
    text, files = report(runs, tmp_path / "report")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert list(rows) == ["base", "close", "far"]  # the baseline first, wherever it was given
    assert "changes vs base" in text.splitlines()[0]
    assert (
        "(n.s.)" in rows["close"]
        and "(*)" in rows["far"]
        and "model.optimizer.lr=0.002" in rows["far"]
    )
    assert "3.0500 ± 0.0289" in rows["base"] and "| 3 |" in rows["base"]  # standard error
    assert all(f.is_file() and f.stat().st_size > 1000 for f in files)
    assert "![val_loss_vs_tokens](val_loss_vs_tokens.png)" in files[0].read_text()
    assert runs[0].tokens_at(40) == 40_000 and runs[0].n_params > 0
    from tinyrecipe.experiments.runs import loss_points

    points, names = loss_points(runs[-2:])  # validations after 10 and 20 steps
    assert [p[1] for p in points] == [10_000, 20_000] * 2
    assert names == ["base-seed2"] * 2 + ["base-seed3"] * 2
    other, _ = report(runs, tmp_path / "other", baseline="far")
    assert other.splitlines()[2].startswith("| far |") and "model.optimizer.lr=0.001" in other


def test_a_log_axis_shorter_than_a_decade_keeps_tick_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyrecipe.experiments.compare import log_x_axis

    for xs, labelled in (([10_000, 20_000], True), ([1e3, 1e6], False)):
        fig, ax = plt.subplots()
        ax.plot(xs, [1, 2])
        log_x_axis(ax)
        fig.canvas.draw()
        minor = [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
        major = [t.get_text() for t in ax.xaxis.get_majorticklabels() if t.get_text()]
        assert bool(minor) == labelled and (minor or major)
        plt.close(fig)


def test_the_documented_sweep_glob_runs_the_base_first():
    """docs/ablations.md: `tinyrecipe sweep --base recipes/ablations/base.yaml
    recipes/ablations/*.yaml --dry-run` lists the base (the baseline) and each overlay once."""
    overlays = sorted(str(p) for p in (ROOT / "recipes/ablations").glob("*.yaml"))
    listed = cli(
        "sweep", "--base", ROOT / "recipes/ablations/base.yaml", *overlays, "--dry-run"
    ).stdout.splitlines()
    names = [line.split(" [")[0] for line in listed]
    assert names[0] == "base" and sorted(names[1:]) == sorted(
        Path(p).stem for p in overlays if Path(p).stem != "base"
    )
    assert "--config" in listed[0] and listed[0].count("--config") == 1
    from tinyrecipe.cli.fit import parse_recipe

    seeded = cli(
        "sweep", "--base", ROOT / "recipes/ablations/base.yaml", "--seeds", "7", "--dry-run"
    ).stdout.splitlines()[0]
    argv = shlex.split(seeded.split("]: ", 1)[1])
    recipe, _ = parse_recipe(argv[argv.index("fit") + 1 :])
    assert recipe["seed_everything"] == 7 and recipe["data"]["init_args"]["seed"] == 7


def localised_ladder_base(corpus, tmp):
    root = corpus["root"]
    text = (ROOT / "recipes/ladder/cpu/base.yaml").read_text()
    for old, new in {
        "data/quickstart/prepared/slimpajama": str(root / "slim"),
        "data/quickstart/prepared/starcoderdata": str(root / "star"),
        "data/quickstart/tokenizer": str(root / "tok"),
        "vocab_size: 4096": "vocab_size: 1024",
        "out/ladder-cpu": str(tmp / "out"),
    }.items():
        text = text.replace(old, new)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "base.yaml").write_text(text)
    return tmp / "base.yaml"


def cli(*args):
    """A tinyrecipe command in this process (the ones here start no training): exit code and
    stdout."""
    import io
    from contextlib import redirect_stdout
    from types import SimpleNamespace

    from tinyrecipe.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr="")


def test_cpu_mini_ladder_end_to_end(corpus, tmp_path):
    """ladder (3 sizes) -> sweep (one interrupted run resumed, one finished run skipped) ->
    compare -> fit-law -> plan --law, as a user types them."""
    base = localised_ladder_base(corpus, tmp_path)
    made = cli(
        "ladder",
        "--base",
        base,
        "--sizes",
        "d32-l2,d64-l2,d96-l3",
        "--tokens-per-param",
        "0.25",
        "--out",
        tmp_path / "ladder",
        "--evals",
        "4",
    )
    assert made.returncode == 0, made.stderr[-2000:]
    overlays = sorted((tmp_path / "ladder").glob("*.yaml"))
    assert [p.stem for p in overlays] == ["d32-l2-0.25x", "d64-l2-0.25x", "d96-l3-0.25x"]
    runs = tmp_path / "runs"
    sweep = ["sweep", "--base", base, *overlays, "--out", runs]
    slurm = cli(*sweep, "--slurm")
    assert slurm.returncode == 0 and "#SBATCH --array=1-3" in (runs / "sweep.sbatch").read_text()
    # the first run killed mid-way: the sweep resumes it
    killed = tinyrecipe(
        *sweep, "--only", "d32-l2-0.25x", TINYRECIPE_KILL_AT="train.after_backward:30"
    )
    assert killed.returncode == 1 and "FAILED" in killed.stdout
    done = tinyrecipe(*sweep, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "d32-l2-0.25x: resuming" in done.stdout and done.stdout.count(": starting") == 2
    again = cli(*sweep)
    assert again.stdout.count("done, skipped") == 3
    dirs = sorted(runs.glob("d*"))
    compared = cli("compare", *dirs, "--out", tmp_path / "report")
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "model.config.d_model=64" in compared.stdout
    assert (tmp_path / "report/val_loss_vs_flops.png").is_file()
    law = cli("fit-law", *dirs, "--out", tmp_path / "law.json", "--bootstrap", "10")
    assert law.returncode == 0, law.stderr[-2000:]
    fitted = json.loads((tmp_path / "law.json").read_text())
    assert len(fitted["points"]) >= 9 and (tmp_path / "law.png").is_file()
    target = max(p[2] for p in fitted["points"]) - 0.1
    plan = cli("plan", "--law", tmp_path / "law.json", "--target-loss", target, "--json")
    assert plan.returncode == 0, plan.stderr[-2000:]
    summary = json.loads(plan.stdout)
    assert summary["n_params"] > 0 and summary["loss"] == pytest.approx(target, rel=1e-3)
    said = cli("plan", "--law", tmp_path / "law.json", "--target-loss", target).stdout
    constants = re.search(r"\(fit E=(\S+), A=(\S+), B=(\S+), alpha=(\S+), beta=(\S+)\)", said)
    assert constants and all(len(c.rstrip(",")) <= 10 for c in constants.groups()), said[:300]


def test_a_failed_new_sweep_run_leaves_no_logs_for_compare(tmp_path):
    """A run that fails before its first checkpoint keeps its sweep.log and no events file (which
    compare would read as a run); a run with a checkpoint keeps everything to resume."""
    import sys

    from tinyrecipe.experiments.sweep import SweepRun, run_sweep

    class Failing(SweepRun):
        def command(self) -> list[str]:
            write = "p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); (p / 'events').write_text('x')"
            code = f"import pathlib, sys; {write}; print('boom'); sys.exit(1)"
            return [sys.executable, "-c", code, str(self.directory / "tensorboard")]

    run = Failing("base", [], tmp_path / "base")
    assert run_sweep([run], log=lambda *_: None) == [run]
    assert not (run.directory / "tensorboard").exists()
    assert "boom" in (run.directory / "sweep.log").read_text()


@pytest.mark.parametrize("ladder", ["recipes/ladder", "recipes/ladder/cpu"])
def test_a_ladder_bases_comment_names_the_command_that_wrote_its_overlays(ladder):
    base = (ROOT / ladder / "base.yaml").read_text()
    comment = re.search(r"^#\s+(tinyrecipe ladder .*?)$(?!\n#\s+--)", base, re.M | re.S)
    said = " ".join(comment.group(1).replace("\\\n#", " ").split())
    overlays = [p for p in (ROOT / ladder).glob("*.yaml") if p.name != "base.yaml"]
    assert overlays
    for overlay in overlays:
        written = re.search(r"^# Written by: (.*)$", overlay.read_text(), re.M).group(1)
        assert " ".join(written.split()) == said, overlay.name

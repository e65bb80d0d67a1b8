"""Running a set of overlays on one base recipe, each (and each seed) in its own run directory.

A run whose `sweep-done.json` exists is skipped; one with checkpoints but no marker was
interrupted and resumes with `--ckpt_path last`. Locally the runs go one after another; for a
cluster, `slurm_script` writes an sbatch array (one task per run) whose tasks call `tinyrecipe
sweep --only NAME`, so skipping and resuming work the same way there."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinyrecipe.io import atomic_write, remove

DONE = "sweep-done.json"


@dataclass
class SweepRun:
    name: str
    configs: list[Path]
    directory: Path
    seed: int | None = None
    sets: list[str] = field(default_factory=list)  # key=value

    def state(self) -> str:
        """'done', 'interrupted' (checkpoints, no marker) or 'new'."""
        if (self.directory / DONE).is_file():
            return "done"
        if (self.directory / "checkpoints/last.ckpt").exists():
            return "interrupted"
        return "new"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tinyrecipe.cli", "fit"]
        for config in self.configs:
            cmd += ["--config", str(config)]
        cmd += ["--trainer.default_root_dir", str(self.directory)]
        if self.seed is not None:  # the initialisation and the data's order
            cmd += ["--seed_everything", str(self.seed), "--data.seed", str(self.seed)]
        for item in self.sets:
            key, _, value = item.partition("=")
            cmd += [f"--{key}", value]
        if self.state() == "interrupted":
            cmd += ["--ckpt_path", "last"]
        return cmd


def plan_sweep(
    base: str | Path,
    overlays: list[str | Path],
    out: str | Path,
    seeds: list[int] | None = None,
    sets: list[str] | None = None,
) -> list[SweepRun]:
    """One run per overlay and seed, named after its recipe file (`<name>-seed<N>` with seeds),
    under `out`. The base runs alone too, first and named `base`, when it is listed among the overlays (`sweep
    --base DIR/base.yaml DIR/*.yaml`) or there are none: the baseline `compare` measures the
    others against (a ladder's base, not listed, is no run of its own)."""
    base, out = Path(base), Path(out)
    for path in [base, *map(Path, overlays)]:
        if not path.is_file():
            raise FileNotFoundError(f"recipe '{path}' does not exist")
    for item in sets or []:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"--set {item!r} is not key=value (e.g. --set trainer.max_steps=200)")
    listed = [o for o in overlays if Path(o).resolve() != base.resolve()]
    with_base = len(listed) < len(overlays) or not overlays
    runs = []
    for overlay in [None] * with_base + listed:
        name = Path(overlay).stem if overlay else "base"
        configs = [base] + ([Path(overlay)] if overlay else [])
        for seed in seeds or [None]:
            run_name = name if seed is None else f"{name}-seed{seed}"
            runs.append(SweepRun(run_name, configs, out / run_name, seed, list(sets or [])))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"overlay file names repeat ({names}); each run needs its own name")
    return runs


def run_sweep(runs: list[SweepRun], log=print) -> list[SweepRun]:
    """Run each run that is not done, one after another; returns the runs that failed (they
    stay resumable: run the sweep again)."""
    failed = []
    for n, run in enumerate(runs, 1):
        state = run.state()
        if state == "done":
            log(f"[{n}/{len(runs)}] {run.name}: done, skipped")
            continue
        cmd = run.command()
        log(f"[{n}/{len(runs)}] {run.name}: {'resuming' if state == 'interrupted' else 'starting'}")
        log("  " + shlex.join(cmd))
        run.directory.mkdir(parents=True, exist_ok=True)
        if state == "new":  # logs of an earlier attempt that left no checkpoint to resume
            remove(run.directory / "tensorboard")
        start = time.perf_counter()
        with open(run.directory / "sweep.log", "a") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        if code == 0:
            marker = {"command": cmd, "seconds": round(seconds, 1)}
            atomic_write(run.directory / DONE, json.dumps(marker, indent=1))
            log(f"  done in {seconds:.0f} s")
        else:
            failed.append(run)
            if run.state() == "new":  # nothing to resume: no logs for compare to read
                remove(run.directory / "tensorboard")
            log(f"  FAILED (exit {code}); see {run.directory / 'sweep.log'}")
    return failed


def slurm_script(runs: list[SweepRun], argv: list[str], out: str | Path) -> Path:
    """`out/sweep.sbatch`: an array job, one task per run, each `tinyrecipe sweep ... --only
    NAME` (the same skip/resume rules). Add your cluster's #SBATCH lines (partition, GPUs,
    time) before submitting it with `sbatch`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = out / "sweep-runs.txt"
    atomic_write(names, "".join(f"{r.name}\n" for r in runs))
    sweep = [a for a in argv if a != "--slurm"]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --array=1-{len(runs)}",
        "#SBATCH --job-name=tinyrecipe-sweep",
        f"#SBATCH --output={out}/slurm-%A_%a.out",
        "# add: #SBATCH --partition=... --gres=gpu:8 --time=... (your cluster's)",
        "set -euo pipefail",
        f'NAME=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(names))})',
        f'srun {shlex.join([sys.executable, "-m", "tinyrecipe.cli", "sweep", *sweep])} --only "$NAME"',
    ]
    path = out / "sweep.sbatch"
    atomic_write(path, "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path

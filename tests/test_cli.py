import os
import subprocess

import pytest

from tests.conftest import ROOT
from tinyrecipe import cli
from tinyrecipe.cli import smoke

pytestmark = pytest.mark.fast  # make test-fast


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "smoke" in out and "eval" in out
    assert "  test " not in out  # a LightningCLI subcommand with no test loop is not offered


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_smoke_trains_and_samples(capsys):
    assert cli.main(["smoke", "--steps", "12", "--batch", "4", "--block", "32"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s; loss" in out and "sample: The " in out


def test_stdlib_text_is_deterministic():
    a, b = smoke.stdlib_text_bytes(), smoke.stdlib_text_bytes()
    assert len(a) > 100_000 and a.equal(b)


def test_the_slurm_template_requeues_a_failed_run_max_restarts_times(tmp_path):
    """The template's failure branch, run by bash with stand-ins for srun (a crash) and scontrol:
    MAX_RESTARTS requeues in all, however many time-limit requeues SLURM_RESTART_COUNT holds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 3"), ("scontrol", f'echo "$@" >> {tmp_path}/scontrol')):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7")
    env |= dict(SLURM_RESTART_COUNT="9", MAX_RESTARTS="2", CRASHES=str(tmp_path / "crashes"))
    codes = [
        subprocess.run(["bash", ROOT / "examples/slurm/fit.sbatch"], env=env).returncode
        for _ in range(3)
    ]
    assert codes[:2] == [0, 0] and codes[2] != 0
    assert (tmp_path / "scontrol").read_text() == "requeue 7\n" * 2
    assert (tmp_path / "crashes").read_text() == "3\n"


def test_the_slurm_template_runs_the_flagship_fit_command():
    """examples/slurm/fit.sbatch: requeued with a signal to every task, and its srun line is a
    `tinyrecipe fit` command the parser accepts, for 2 nodes of 8 GPUs."""
    import shlex

    from tinyrecipe.cli.fit import parse_recipe

    text = (ROOT / "examples/slurm/fit.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR1@" in text  # tasks, not B:
    line = " ".join(text.split("\nsrun ", 1)[1].replace("\\\n", " ").split())
    line, on_failure = line.split("||", 1)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in on_failure and "$CRASHES" in on_failure
    env = {"RECIPE": "recipes/tinyllama-1.1b.yaml", "SLURM_NNODES": "2"}
    env["SLURM_NTASKS_PER_NODE"] = "8"
    for name, value in env.items():
        line = line.replace(f'"${name}"', value).replace(f"${{{name}:-{value}}}", value)
    argv = shlex.split(line)
    assert argv[1:3] == ["tinyrecipe", "fit"], argv
    recipe, _ = parse_recipe(argv[3:])  # ckpt_path is fit's argument, not the recipe's
    assert (recipe["trainer"]["num_nodes"], int(recipe["trainer"]["devices"])) == (2, 8)
    assert "--ckpt_path auto" in line and recipe["slurm_requeue"]["signal_name"] == "SIGUSR1"
    assert recipe["watchdog"]["timeout_s"] == 600

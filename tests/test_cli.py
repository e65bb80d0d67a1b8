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


def test_the_slurm_template_runs_the_flagship_fit_command():
    """examples/slurm/fit.sbatch: requeued with a signal to every task, and its srun line is a
    `tinyrecipe fit` command the parser accepts, for 2 nodes of 8 GPUs."""
    import shlex

    from tinyrecipe.cli.fit import parse_recipe

    text = (ROOT / "examples/slurm/fit.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR1@" in text  # tasks, not B:
    line = " ".join(text.split("\nsrun ", 1)[1].replace("\\\n", " ").split())
    line, on_failure = line.split("||")
    assert 'scontrol requeue "$SLURM_JOB_ID"' in on_failure and "SLURM_RESTART_COUNT" in on_failure
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

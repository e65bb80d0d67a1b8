import pytest

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

"""The Fabric loop trains exactly like the Trainer path, on 1 and 2 CPU processes."""

import subprocess

import pytest

from tests.conftest import tinyrecipe
from tests.test_training import fit, scalars, write_recipe
from tinyrecipe.interop.checkpoint import load_tinyrecipe_checkpoint


def fabric(recipe, *extra: str) -> subprocess.CompletedProcess:
    return tinyrecipe("fabric", "--config", recipe, *extra)


def test_fabric_loop_matches_the_trainer_loss_sequence(corpus, tmp_path):
    recipe = write_recipe(tmp_path / "trainer", corpus, max_steps=6, every=3)
    result = fit(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    trainer = scalars(tmp_path / "trainer/tensorboard")

    recipe = write_recipe(tmp_path / "fabric", corpus, max_steps=6, every=3)
    result = fabric(recipe, "--trainer.log_every_n_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    loop = scalars(tmp_path / "fabric/fabric")
    assert len(trainer["train/loss"]) == len(loop["train/loss"]) == 6
    for (s1, a), (s2, b) in zip(trainer["train/loss"], loop["train/loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5), (s1, s2)
    # the same evaluations: step 0, then every 3 steps, per source and mixed
    assert [round(v, 5) for _, v in trainer["val/loss"]] == [
        round(v, 5) for _, v in loop["val/loss"]
    ]
    assert "val/loss/slimpajama" in loop
    # its checkpoint is the shared layout: generate / convert / init_from read it
    config, state = load_tinyrecipe_checkpoint(tmp_path / "fabric/fabric/last.ckpt")
    assert config.n_layer == 2 and "embed.weight" in state


@pytest.mark.parametrize(
    "strategy",
    ["ddp", "fsdp2"],
    ids=["ddp", "fsdp2"],
)
def test_fabric_two_processes_match_one(corpus, tmp_path, strategy):
    one = write_recipe(tmp_path / "one", corpus, max_steps=3, every=100, batch_size=4)
    assert fabric(one, "--trainer.log_every_n_steps", "1").returncode == 0
    two = write_recipe(tmp_path / "two", corpus, max_steps=3, every=100, batch_size=2)
    result = fabric(
        two,
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        strategy,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a = scalars(tmp_path / "one/fabric")["train/loss"]
    b = scalars(tmp_path / "two/fabric")["train/loss"]
    assert len(a) == len(b) == 3
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-4)

"""The Fabric loop trains exactly like the Trainer path, on 1 and 2 CPU processes."""

import subprocess

import pytest

from tests.conftest import tinyrecipe
from tests.test_training import fit, scalars, write_recipe
from tinyrecipe.checkpoint import load_tinyrecipe_checkpoint
from tinyrecipe.train.journal import read_journal, run_status


def fabric(recipe, *extra: str) -> subprocess.CompletedProcess:
    return tinyrecipe("fabric", "--config", recipe, *extra)


def test_fabric_refuses_data_without_a_stream_position_in_one_line():
    from tinyrecipe.train.fabric import train

    boring = "lightning.pytorch.demos.boring_classes.BoringDataModule"
    with pytest.raises(ValueError, match="BoringDataModule does not"):
        train({"data": {"class_path": boring}})


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
    # each step's loss beside the learning rate it was taken with (warmup 2: 1.5e-3, 3e-3, ...)
    lrs = [v for _, v in loop["lr"]]
    assert lrs == pytest.approx([v for _, v in trainer["lr-AdamW"]], rel=1e-6), lrs
    # the same evaluations: step 0, then every 3 steps, per source and mixed
    assert [round(v, 5) for _, v in trainer["val/loss"]] == [
        round(v, 5) for _, v in loop["val/loss"]
    ]
    assert "val/loss/slimpajama" in loop
    # its checkpoint is the shared layout: generate / convert / init_from read it
    config, state = load_tinyrecipe_checkpoint(tmp_path / "fabric/fabric/last.ckpt")
    assert config.n_layer == 2 and "embed.weight" in state


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The logs of 3 Fabric steps on one process, 4 rows a step."""
    root = tmp_path_factory.mktemp("one")
    one = write_recipe(root, corpus, max_steps=3, every=100, batch_size=4)
    assert fabric(one, "--trainer.log_every_n_steps", "1").returncode == 0
    return scalars(root / "fabric")


@pytest.mark.parametrize(
    ("strategy", "resumed_batch"),
    [
        (["--trainer.strategy", "ddp"], "4"),
        # FSDP2Strategy's options reach the Fabric loop: a (replicate 2, shard 1) HSDP mesh,
        # 2 micro-batches a step with the weights kept gathered between them
        (
            [
                "--trainer.strategy",
                "fsdp2",
                "--trainer.strategy.shard_group_size",
                "1",
                "--trainer.strategy.reshard_after_forward",
                "false",
                "--trainer.strategy.reshard_after_backward",
                "false",
                "--trainer.accumulate_grad_batches",
                "2",
                "--data.batch_size",
                "1",
            ],
            "2",
        ),
    ],
    ids=["ddp", "hsdp-accumulating"],
)
def test_fabric_two_processes_match_one_and_resume_on_one(
    one_process, corpus, tmp_path, strategy, resumed_batch
):
    """3 steps on one process against 2 steps on two processes resumed on one for the third
    (elastic: 2 x 2 rows or 2 x 2 micro-batches of 1, then 4 rows a step; the same samples in
    the same steps)."""
    log = ["--trainer.log_every_n_steps", "1"]
    two = write_recipe(tmp_path / "two", corpus, max_steps=2, every=100, batch_size=2)
    result = fabric(two, *log, "--trainer.devices", "2", *strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = fabric(
        two,
        *log,
        *strategy,
        "--trainer.devices",
        "1",
        "--data.batch_size",
        resumed_batch,
        "--trainer.max_steps",
        "3",
        "--resume",
        str(tmp_path / "two/fabric/last.ckpt"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = one_process, scalars(tmp_path / "two/fabric")
    assert [s for s, _ in b["train/loss"]] == [1, 2, 3]
    for (_, x), (_, y) in zip(a["train/loss"], b["train/loss"], strict=True):
        assert x == pytest.approx(y, abs=1e-4)
    assert b["train/tokens_seen"] == a["train/tokens_seen"]  # from the data position
    starts = [e for e in read_journal(tmp_path / "two/fabric") if e["event"] == "start"]
    assert [(e["world_size"], e["step"], e["why"]) for e in starts] == [
        (2, 0, "fresh"),
        (1, 2, "given"),
    ]
    assert run_status(read_journal(tmp_path / "two/fabric")).finished


def test_fabric_refuses_fsdp1_in_one_line():
    """FSDP1's flat sharded gradients would be normed as if replicated: refused, as in fit."""
    from tinyrecipe.train.fabric import train

    for spec in ("fsdp", {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}):
        with pytest.raises(ValueError, match=r"FSDPStrategy \(FSDP1\) is not supported"):
            train({"trainer": {"strategy": spec}})


def test_a_kill_before_the_last_link_moves_leaves_last_naming_a_whole_checkpoint(
    one_process, corpus, tmp_path
):
    """Killed after step 3's checkpoint is in place but before `last.ckpt` points at it: last
    still names step 2's, whole, and the resumed step 3 logs the uninterrupted run's loss."""
    log = ["--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "2"]
    run = write_recipe(tmp_path, corpus, max_steps=3, every=100, batch_size=4)
    killed = tinyrecipe("fabric", "--config", run, *log, TINYRECIPE_KILL_AT="checkpoint.link:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "fabric/last.ckpt"
    assert last.resolve().name == "step=2.ckpt"
    resumed = fabric(run, *log, "--resume", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last.resolve().name == "step=3.ckpt"
    assert sorted(p.name for p in last.parent.glob("step=*")) == ["step=2.ckpt", "step=3.ckpt"]
    steps = dict(scalars(tmp_path / "fabric")["train/loss"])
    assert steps[3] == pytest.approx(dict(one_process["train/loss"])[3], abs=1e-6)


def test_fabric_refuses_what_it_would_do_otherwise_than_fit():
    """Clipping by value, and a validation interval that is not whole optimizer steps (which
    would round down, to none at all below one step), are refused in one line; a
    `seed_everything: true` draws a seed as Lightning does, `false` seeds nothing."""
    from tinyrecipe.train.fabric import LoopSettings

    trainer = {"accumulate_grad_batches": 4, "val_check_interval": 8}
    assert LoopSettings.from_recipe({"trainer": trainer}).val_every == 2
    with pytest.raises(ValueError, match="val_check_interval: 2 is not a whole number"):
        LoopSettings.from_recipe({"trainer": dict(trainer, val_check_interval=2)})
    with pytest.raises(ValueError, match="gradient_clip_algorithm: value"):
        LoopSettings.from_recipe({"trainer": dict(trainer, gradient_clip_algorithm="value")})
    for given, seed in ((True, True), (False, False), (None, 0), (7, 7)):
        assert LoopSettings.from_recipe({"trainer": {}, "seed_everything": given}).seed is seed


def test_fabric_refuses_a_new_run_into_a_directory_of_checkpoints(tmp_path):
    from tinyrecipe.train.fabric import train

    (tmp_path / "fabric").mkdir()
    (tmp_path / "fabric/step=50.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"earlier run; resume it with --resume .*last\.ckpt"):
        train({"trainer": {"default_root_dir": str(tmp_path)}})

"""Training in stages through `tinyrecipe fit`: TinyLlama v1.1's three stages in miniature
(recipes/tinyllama-v1.1/miniature), kill -9 inside a ramp, a cooldown with a bigger batch, and
elastic resume (1 -> 2 -> 1 processes under DDP and FSDP2) against a run that never changed."""

import shutil

import pytest
import torch

from tests.conftest import ROOT
from tests.test_training import final_weights, fit, scalars

MINI = ROOT / "recipes/tinyllama-v1.1/miniature"
STAGES = ("stage1.yaml", "stage2.yaml", "stage3.yaml")
# fp32 losses of runs that differ only in reduction order (2 ranks vs 1, sharded or not), 26
# steps after the change: the bound (the largest difference measured is in the docs).
ELASTIC_TOL = 1e-4


def localise(corpus, run) -> list:
    """Copies of the miniature's stage files that read the test corpus and write under `run`."""
    root = corpus["root"]
    swap = {
        "data/quickstart/prepared/slimpajama": str(root / "slim"),
        "data/quickstart/prepared/starcoderdata": str(root / "star"),
        "data/quickstart/tokenizer": str(root / "tok"),
        "out/tinyllama-v1.1-miniature": str(run),
        "vocab_size: 4096": "vocab_size: 1024",
    }
    run.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in STAGES:
        text = (MINI / name).read_text()
        for old, new in swap.items():
            text = text.replace(old, new)
        (run / name).write_text(text)
        paths.append(run / name)
    return paths


def stages(run, n: int, *extra: str, **env: str):
    """`tinyrecipe fit` with the first n stage files stacked."""
    s1, *more = (run / name for name in STAGES[:n])
    return fit(s1, *[a for p in more for a in ("--config", str(p))], *extra, **env)


def losses(run) -> dict[int, float]:
    return dict(scalars(run / "tensorboard")["train/loss"])  # a resumed step: its latest value


def data_state(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["MixedStreamingDataModule"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Stages 1 and 2 in one uninterrupted run: 40 steps, Starcoderdata entering at step 14 and
    ramping until step 30."""
    run = tmp_path_factory.mktemp("stages-reference")
    localise(corpus, run)
    result = stages(run, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.faults
def test_three_stages_resume_bitwise_across_a_boundary_and_a_kill_in_a_ramp(
    corpus, reference, tmp_path
):
    localise(corpus, tmp_path)
    # stage 1 alone, killed in step 11 (the 23rd micro-batch): its last checkpoint is step 8
    killed = stages(tmp_path, 1, TINYRECIPE_KILL_AT="train.after_backward:23")
    assert killed.returncode == -9, killed.stderr[-2000:]
    # stage 2 added on resume from step 8: across the boundary at 14, killed in step 22 (ramp)
    killed = stages(
        tmp_path, 2, "--ckpt_path", "last", TINYRECIPE_KILL_AT="train.after_backward:29"
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = stages(tmp_path, 2, "--ckpt_path", "last")  # from step 20, inside the ramp
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = final_weights(reference / "checkpoints/last.ckpt")
    got = final_weights(tmp_path / "checkpoints/last.ckpt")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert losses(tmp_path) == losses(reference)
    assert data_state(tmp_path / "checkpoints/last.ckpt")["samples_consumed"] == 40 * 8

    # stage 3: twice the batch, the learning rate decays from step 40 to min_lr over 10 steps
    branch_point = str(tmp_path / "checkpoints/step=40.ckpt")  # decay_from read from it
    cooled = stages(tmp_path, 3, "--ckpt_path", "last", "--model.schedule.decay_from", branch_point)
    assert cooled.returncode == 0, cooled.stderr[-3000:]
    logged = scalars(tmp_path / "tensorboard")
    lr = dict(logged["lr-AdamW"])
    assert lr[40] == pytest.approx(3e-3) and lr[39] == pytest.approx(3e-3)
    assert lr[45] == pytest.approx(3e-4 + 0.5 * 2.7e-3) and lr[49] == pytest.approx(5.7e-4)
    state = data_state(tmp_path / "checkpoints/last.ckpt")
    assert (state["samples_consumed"], state["global_batch"]) == (40 * 8 + 10 * 16, 16)
    assert dict(logged["train/tokens_seen"])[49] == (40 * 8 + 10 * 16) * 64
    assert max(dict(logged["train/loss"])) == 49


@pytest.mark.parametrize(
    "strategy",
    [["--trainer.strategy", "ddp"], ["--trainer.strategy", "fsdp2"]],
    ids=["ddp", "fsdp2"],
)
def test_elastic_resume_one_two_one_processes_trains_like_the_unchanged_run(
    corpus, reference, tmp_path, strategy
):
    """Steps 12-25 on 2 processes (accumulation 2 -> 1), 26-39 on 1 again: the sample
    sequence, the model and the optimizer state carry over, so the losses are the unchanged
    run's up to fp32 reduction order."""
    localise(corpus, tmp_path)
    fsdp2 = "fsdp2" in strategy
    if fsdp2:  # the first leg writes a sharded checkpoint of one process
        first = stages(tmp_path, 2, *strategy, "--trainer.max_steps", "12")
        assert first.returncode == 0, first.stderr[-3000:]
        start = tmp_path / "checkpoints/last.ckpt"
    else:
        start = tmp_path / "step=12.ckpt"
        shutil.copy(reference / "checkpoints/step=12.ckpt", start)
    two = stages(
        tmp_path,
        2,
        *strategy,
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        "26",
        "--ckpt_path",
        str(start),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = stages(tmp_path, 2, *(strategy if fsdp2 else []), "--ckpt_path", "last")
    assert one.returncode == 0, one.stderr[-3000:]
    want, got = losses(reference), losses(tmp_path)
    assert sorted(got)[-28:] == list(range(12, 40))
    worst = max(abs(got[s] - want[s]) for s in range(12, 40))
    print(f"elastic {strategy[-1]}: largest loss difference {worst:.2e}")
    assert worst < ELASTIC_TOL
    ref, run = scalars(reference / "tensorboard"), scalars(tmp_path / "tensorboard")
    # the gradient norm from local shards and one all-reduce is the whole gradient's, and
    # validation split over 2 ranks (logged at 15, inside the 2-process leg) gives the 1-rank one
    norms = dict(run["train/grad_norm"])
    for step, norm in ref["train/grad_norm"]:
        if 12 <= step < 40:
            assert norms[step] == pytest.approx(norm, rel=1e-5), step
    assert dict(run["val/loss"])[15] == pytest.approx(dict(ref["val/loss"])[15], abs=1e-5)

"""kill -9 a real `tinyrecipe fit` at exact places (failpoints) and resume with --ckpt_path last:
the final weights and the logged training losses equal the uninterrupted run's, bitwise."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.test_training import MICRO, final_weights, fit, scalars, write_recipe
from tinyrecipe.data.mixture import MixtureSchedule, TokenBlocks
from tinyrecipe.train.journal import read_journal, run_status

pytestmark = pytest.mark.faults

STEPS, EVERY = 8, 4  # checkpoints (and validations) at steps 4 and 8


def killed_fit(recipe, point: str, *extra: str) -> subprocess.CompletedProcess:
    return fit(recipe, *extra, TINYRECIPE_KILL_AT=point)


def last_per_step(values: list[tuple[int, float]]) -> dict[int, float]:
    """A resumed run logs the steps after its checkpoint again: keep the latest value of each."""
    return dict(values)


def assert_same_run(ref_dir, run_dir) -> None:
    want, got = (
        final_weights(ref_dir / "checkpoints/last.ckpt"),
        final_weights(run_dir / "checkpoints/last.ckpt"),
    )
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ref, run = scalars(ref_dir / "tensorboard"), scalars(run_dir / "tensorboard")
    assert last_per_step(run["train/loss"]) == last_per_step(ref["train/loss"])
    ref_val, run_val = last_per_step(ref["val/loss"]), last_per_step(run["val/loss"])
    assert run_val[max(run_val)] == ref_val[max(ref_val)]  # the final evaluation


def writes_per_checkpoint(ckpt) -> int:
    """How many write() calls torch.save makes for a checkpoint like `ckpt`."""

    class Counter:
        n = 0

        def write(self, data):
            Counter.n += 1
            return len(data)

        def flush(self):
            pass

    torch.save(torch.load(ckpt, weights_only=True), Counter())
    return Counter.n


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    ref = tmp_path_factory.mktemp("reference")
    result = fit(write_recipe(ref, corpus, max_steps=STEPS, every=EVERY))
    assert result.returncode == 0, result.stderr[-3000:]
    return ref


@pytest.mark.parametrize(
    "point",
    [
        "train.after_backward:6",
        "val.batch:6",
        "checkpoint.write:mid-second-save",
        "checkpoint.rename:2",
    ],
    ids=["mid-step", "during-validation", "mid-checkpoint-write", "checkpoint-before-rename"],
)
def test_kill_and_resume_equals_the_uninterrupted_run(corpus, reference, tmp_path, point):
    # one loader worker here (the reference has none): the batch order must not depend on it
    workers = 1 if point.startswith("train.") else 0
    recipe = write_recipe(tmp_path, corpus, max_steps=STEPS, every=EVERY, workers=workers)
    if point == "checkpoint.write:mid-second-save":
        # saves: the step-4 file (last.ckpt links to it), the step-8 file -> kill halfway through
        per = writes_per_checkpoint(reference / "checkpoints/last.ckpt")
        point = f"checkpoint.write:{per + per // 2}"
    killed = killed_fit(recipe, point)
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    last = tmp_path / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == EVERY  # the good one, whole
    resumed = fit(recipe, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*")), "a killed save left its temp file"
    events = read_journal(tmp_path)  # the kill, the restart and where it resumed, in the journal
    status = run_status(events)
    assert (status.sessions, status.restarts, status.finished, status.step) == (2, 1, True, STEPS)
    restart = [e for e in events if e["event"] == "start"][-1]
    assert restart["step"] == EVERY and restart["why"] == "given"
    assert restart["resumed_from"].endswith("last.ckpt") and 0 < status.goodput < 1


def test_kill_right_after_a_mixture_epoch_boundary(corpus, tmp_path):
    """Die in the step after the one in which a source's epoch ends: the resume starts from the
    checkpoint right after the boundary and continues the source's second epoch exactly."""
    import json

    from tests.conftest import script
    from tests.test_data import write_zst

    # a small prose source (~40 blocks) so its first epoch ends within a few steps
    docs = [json.dumps({"text": f"Document {i} says {i * 7 % 13} things. " * 6}) for i in range(60)]
    for split in ("train", "validation"):
        write_zst(tmp_path / f"raw/{split}/a.jsonl.zst", [d.encode() for d in docs])
    script(
        "prepare_slimpajama.py",
        "--input",
        tmp_path / "raw",
        "--tokenizer",
        corpus["root"] / "tok",
        "--out",
        tmp_path / "small",
    )
    batch = 8
    small = TokenBlocks(str(tmp_path / "small/train"), MICRO["block_size"])
    schedule = MixtureSchedule([0.7, 0.3], seed=42)
    i = 0
    while schedule.locate(i) != (0, len(small)):  # the first draw of its second epoch
        i += 1
    boundary_step = i // batch + 1  # 1-based step holding that draw
    extra = ["--data.batch_size", str(batch)]

    def recipe(root):  # a checkpoint after every step; validation at the start and the end
        path = write_recipe(root, corpus, max_steps=boundary_step + 3, every=1)
        config = yaml.safe_load(path.read_text())
        config["trainer"]["val_check_interval"] = boundary_step + 3
        config["data"]["sources"][0]["train"] = str(tmp_path / "small/train")
        path.write_text(yaml.safe_dump(config))
        return path

    ref = tmp_path / "ref"
    assert fit(recipe(ref), *extra).returncode == 0
    run = tmp_path / "run"
    killed = killed_fit(recipe(run), f"train.after_backward:{boundary_step + 1}", *extra)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (
        torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == boundary_step
    )
    resumed = fit(recipe(run), *extra, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(ref, run)


def test_kill_and_resume_on_object_storage(corpus, reference, s3_corpus, tmp_path):
    """The same run on the corpus in an S3 bucket, with a loader worker and a small cache: killed
    mid-step, resumed by itself, it ends equal to the local uninterrupted run."""
    recipe = write_recipe(tmp_path, corpus, max_steps=STEPS, every=EVERY, workers=1)
    spec = yaml.safe_load(recipe.read_text())
    root = str(corpus["root"])
    for source in spec["data"]["sources"]:
        for split in ("train", "validation"):
            if split in source:
                source[split] = source[split].replace(root, s3_corpus)
    spec["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe.write_text(yaml.safe_dump(spec))
    killed = killed_fit(recipe, "train.after_backward:6")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = fit(recipe, "--ckpt_path", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, tmp_path)


def test_slurm_requeue_resumes_the_run(corpus, reference, tmp_path):
    """SLURM emulated: its variables, SIGUSR1 to a process stopped mid-step 5, a stand-in
    `scontrol` on PATH. The run checkpoints step 5 whole, requeues the job and stops; the next
    job (the same command) resumes from it and ends bitwise equal to the uninterrupted run."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "tinyrecipe",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    recipe = write_recipe(tmp_path, corpus, max_steps=STEPS, every=EVERY)
    command = [sys.executable, "-m", "tinyrecipe.cli", "fit", "--config", str(recipe)]
    command += ["--ckpt_path", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **slurm)
    job = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(env, TINYRECIPE_STOP_AT="train.after_backward:5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stat = Path(f"/proc/{job.pid}/stat")
    while job.poll() is None and stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM's warning, taken when the process runs again
    job.send_signal(signal.SIGCONT)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    last = tmp_path / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # the whole step 5
    requeued = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert_same_run(reference, tmp_path)
    events = read_journal(tmp_path)
    assert [(e["event"], e.get("step")) for e in events if e["event"] in ("requeue", "end")] == [
        ("requeue", 5),
        ("end", 5),
        ("end", STEPS),
    ]
    assert [e["step"] for e in events if e["event"] == "start"] == [0, 5]
    status = run_status(events)
    assert (status.sessions, status.restarts, status.finished) == (2, 1, True)

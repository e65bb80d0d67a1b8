"""Prep killed mid-run then rerun equals an uninterrupted prep; a rank without validation data
does not hang a 2-process run."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_training import fit, scalars, write_recipe

pytestmark = pytest.mark.faults


def prep(raw, tok, out, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if kill_at:
        env["TINYRECIPE_KILL_AT"] = kill_at
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "data_prep/prepare_slimpajama.py")]
        + ["--input", str(raw), "--tokenizer", str(tok), "--out", str(out), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    out_text, err_text = proc.communicate(timeout=300)
    with contextlib.suppress(ProcessLookupError):  # a killed parent's pool workers: end them
        os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_text, err_text)


def snapshot(root) -> dict[str, bytes]:
    """Every file under root, with litdata's `updated_at` timestamp blanked."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "index.json":
                index = json.loads(data)
                index.get("config", {}).pop("updated_at", None)
                index.pop("updated_at", None)
                data = json.dumps(index, sort_keys=True).encode()
            files[str(path.relative_to(root))] = data
    return files


@pytest.mark.parametrize("kill_at", ["prep.document:20", "prep.rename:1", "prep.rename:2"])
def test_prep_killed_then_rerun_equals_an_uninterrupted_prep(corpus, tmp_path, kill_at):
    raw, tok = corpus["root"] / "raw/slimpajama", corpus["root"] / "tok"
    clean = prep(raw, tok, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = prep(raw, tok, tmp_path / "killed", kill_at=kill_at)
    assert killed.returncode == -9, (kill_at, killed.returncode, killed.stderr[-2000:])
    rerun = prep(raw, tok, tmp_path / "killed")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "clean")  # no debris either


@pytest.mark.parametrize("strategy", ["fsdp2"])  # DDP takes the same validation path
def test_a_rank_without_validation_data_does_not_hang(corpus, tmp_path, strategy):
    """One validation block for two ranks: rank 1 gets none (only a zero-weight pad item)."""
    flags = ["--trainer.devices", "2"]
    if strategy == "ddp":
        flags += ["--trainer.strategy", "ddp"]
    else:
        flags += ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy"]
        flags += ["--trainer.strategy.data_parallel_size", "2"]
        flags += ["--trainer.strategy.tensor_parallel_size", "1"]
    one = write_recipe(tmp_path / "one", corpus, max_steps=2, every=2)
    assert fit(one, "--data.val_max_blocks", "1").returncode == 0
    two = write_recipe(tmp_path / "two", corpus, max_steps=2, every=2, batch_size=2)
    result = fit(two, "--data.val_max_blocks", "1", *flags, timeout=240)  # a hang fails here
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (
        scalars(tmp_path / "one/tensorboard")["val/loss"],
        scalars(tmp_path / "two/tensorboard")["val/loss"],
    )
    assert len(a) == len(b) == 2
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-5)  # the one block, counted once, not twice

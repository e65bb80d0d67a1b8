"""`tinyrecipe fit` under torchrun's elastic agent: a rank crashed at a failpoint, a rank
SIGKILLed from outside and a rank that hangs (SIGSTOP, found by the hang watchdog) each cost one
restart and no more, and the run resumes on its own (`--ckpt_path auto`) to final weights and
logged losses bitwise equal to an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.faults.test_kill_resume import assert_same_run
from tests.test_training import write_recipe
from tinyrecipe.train.journal import read_journal, run_status
from tinyrecipe.watchdog import HANG_EXIT_CODE

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEPS, EVERY = 8, 2


def two_rank_recipe(tmp: Path, corpus) -> Path:
    recipe = write_recipe(tmp, corpus, max_steps=STEPS, every=EVERY)
    spec = yaml.safe_load(recipe.read_text())
    spec["trainer"].update(devices=2, strategy="ddp")
    spec["ckpt_path"] = "auto"
    spec["watchdog"] = {"timeout_s": 6, "interval_s": 0.5}
    recipe.write_text(yaml.safe_dump(spec))
    return recipe


def torchrun(recipe: Path, log: Path, restarts: int, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "--max-restarts", str(restarts)]
    command += ["-m", "tinyrecipe.cli", "fit", "--config", str(recipe)]
    return subprocess.Popen(
        command,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env),
    )


def stopped_workers(agent: int) -> list[tuple[int, str]]:
    """(pid, restart count) of each SIGSTOPped worker process under the torchrun agent."""
    found = []
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return []
    for child in children:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if state == "T":
            count = [e for e in environ if e.startswith(b"TORCHELASTIC_RESTART_COUNT=")]
            found.append((int(child), count[0].split(b"=")[1].decode() if count else "?"))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_restarts_resume_after_a_crash_a_kill_and_a_hang(corpus, tmp_path):
    ref = two_rank_recipe(tmp_path / "ref", corpus)
    clean = torchrun(ref, tmp_path / "ref.log", restarts=0)
    assert clean.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    recipe, log = two_rank_recipe(tmp_path / "run", corpus), tmp_path / "run.log"
    run = torchrun(
        recipe,
        log,
        restarts=3,  # three faults: a restart wasted would fail the run
        # attempt 0: rank 1 dies in step 5 (checkpoint at 4); attempt 1: rank 0 stops in step
        # 7 (checkpoint at 6) and is killed from outside; attempt 2: rank 1 stops in step 7 and
        # rank 0's watchdog ends the group
        TINYRECIPE_KILL_AT="train.after_backward:5@1#0",
        TINYRECIPE_STOP_AT="train.after_backward:3@0#1,train.after_backward:1@1#2",
    )
    deadline = time.monotonic() + 400
    while run.poll() is None and time.monotonic() < deadline:
        for pid, attempt in stopped_workers(run.pid):
            if attempt == "1":
                os.kill(pid, signal.SIGKILL)  # the external kill
            elif "tinyrecipe: hang:" in log.read_text():
                os.kill(pid, signal.SIGCONT)  # found: let the agent's SIGTERM end the hung rank
        time.sleep(0.1)
    if run.poll() is None:
        run.kill()
    output = log.read_text()
    assert run.returncode == 0, output[-4000:]
    hang = [line for line in output.splitlines() if "tinyrecipe: hang:" in line]
    assert hang and "after step 6" in hang[0] and "stopped: rank 1 (after step 6)" in hang[0], hang
    assert f"rank 0 exits ({HANG_EXIT_CODE})" in hang[0]
    assert "Connection refused" not in output

    assert_same_run(tmp_path / "ref", tmp_path / "run")
    events = read_journal(tmp_path / "run")
    status = run_status(events)
    assert (status.sessions, status.restarts, status.hangs, status.finished) == (4, 3, 1, True)
    starts = [e for e in events if e["event"] == "start"]
    assert [e["step"] for e in starts] == [0, 4, 6, 6]
    assert [e["why"] for e in starts] == ["fresh", "auto", "auto", "auto"]

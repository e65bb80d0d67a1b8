"""The run journal read back: sessions, restarts, replayed steps and goodput, from events."""

import pytest

from tinyrecipe.cli import main as cli
from tinyrecipe.train import journal as journal_module
from tinyrecipe.train.journal import Journal, read_journal, run_status


def test_goodput_leaves_out_start_up_replayed_steps_checkpoint_writes_and_the_kill(
    tmp_path, monkeypatch
):
    journal = Journal(tmp_path)
    events = [  # (time, event, fields): 1 s a step
        (0, "start", {"step": 0, "max_steps": 12, "world_size": 2}),
        (12, "progress", {"step": 2, "tokens": 200, "loss": 5.0}),  # 10 s of start-up
        (14, "progress", {"step": 4, "tokens": 400, "loss": 4.0}),
        (14.5, "checkpoint", {"step": 4, "path": "step=4.ckpt", "seconds": 0.5}),
        (16.5, "progress", {"step": 6, "tokens": 600, "loss": 3.5}),
        (17.5, "progress", {"step": 7, "tokens": 700, "loss": 3.4}),  # killed after step 7
        (30, "start", {"step": 4, "max_steps": 12, "resumed_from": "step=4.ckpt"}),
        (40, "progress", {"step": 6, "tokens": 600, "loss": 3.5}),  # 10 s start-up, 2 replayed
        (46, "progress", {"step": 12, "tokens": 1200, "loss": 3.0}),
        (46.5, "end", {"step": 12, "reason": "done"}),
    ]
    clock = iter(t for t, _, _ in events)
    monkeypatch.setattr(journal_module.time, "time", lambda: next(clock))
    followed = []
    for _, kind, fields in events:
        journal.record(kind, **fields)
        followed.append(journal.goodput())  # kept up to date, never re-read: the same figure
    assert followed == [run_status(journal.events[:n]).goodput for n in range(1, 11)]
    status = run_status(read_journal(tmp_path))
    assert (status.sessions, status.restarts, status.finished, status.step) == (2, 1, True, 12)
    assert status.wall_seconds == pytest.approx(17.5 + 16.5)
    # counted: steps 0-4 of the first session at 1 s, steps 4-12 of the second at 1 s
    assert status.useful_seconds == pytest.approx(4 + 8)
    assert status.goodput == pytest.approx(12 / 34)
    assert status.last_checkpoint == "step=4.ckpt" and status.losses[-1] == 3.0
    assert status.tokens_per_sec == pytest.approx(100)


def test_status_reads_a_journal_and_a_torn_last_line(tmp_path, capsys):
    journal = Journal(tmp_path)
    journal.record("start", step=0, max_steps=10, world_size=1)
    journal.record("progress", step=1, tokens=10, loss=2.0)
    with open(journal.path, "a") as f:
        f.write('{"event": "progr')  # killed mid-line
    assert [e["event"] for e in read_journal(tmp_path)] == ["start", "progress"]
    assert cli(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 1 (not finished)" in out and "restarts: 0" in out
    assert cli(["status", str(tmp_path / "nope")]) == 2


def test_a_run_continued_past_its_end_is_not_finished(tmp_path):
    """A run that ended done and was continued with a larger max_steps: its status follows the
    new session (not finished, the ETA to the new max_steps)."""
    journal = Journal(tmp_path)
    journal.record("start", step=0, max_steps=100, world_size=1)
    journal.record("end", step=100, reason="done")
    journal.record("start", step=100, max_steps=300, world_size=1)
    for step in (150, 200):
        journal.record("progress", step=step, tokens=step * 10, loss=2.0)
    events = read_journal(tmp_path)
    for i, e in enumerate(events):
        e["time"] = float(i)  # progress: 50 steps a second
    status = run_status(events)
    assert not status.finished and status.step == 200
    assert status.eta_seconds == pytest.approx(100 / 50)


def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    """`tinyrecipe status RUN | head -1`: the reader leaves; no error line, exit 0."""
    import os
    import subprocess
    import sys

    Journal(tmp_path).record("start", step=0, max_steps=10, world_size=1)
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", "status", str(tmp_path)],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr

"""The run journal: one append-only `journal.jsonl` per run directory, a JSON line per event, and
what `tinyrecipe status` reads back from it.

Events (each with `time`, seconds since the epoch):

* `start`: a process group began (or resumed) the run: `step`, `world_size`, `recipe_sha256`,
  `resumed_from` (a checkpoint, or null), `why` ("given", "auto", "fresh", or "fall-back" with
  `unreadable` and `unreadable_why`: the checkpoint asked for was damaged) and `restart`
  (torchrun's or SLURM's restart count).
* `progress`: at each logging step: `step`, `tokens`, `loss`, `skipped` (non-finite steps so
  far), `spikes` (spike skips so far).
* `checkpoint`: a checkpoint written: `step`, `path`, `seconds`.
* `hang`: the hang watchdog found no progress and ends the process group: `step`, `message`
  (which rank stopped), `rank` (the rank recording it: 0; the lowest live rank when rank 0 is
  one that stopped, rank 1 when the store stopped answering; `train.elastic.record_hang`). A
  session counts one hang however many ranks recorded it.
* `requeue`: SLURM's requeue signal taken: `step` (checkpointed), `job`.
* `end`: the run stopped: `step`, `reason` ("done"; "stopped" before `max_steps`, as after a
  requeue; or the exception's name).

A `start` after a session that did not end "done" is a restart (the earlier process group was
killed, hung, failed or requeued). Goodput is the share of the wall time spent in steps that
counted: a run's wall time is the sum of its sessions' (start to last event); what counted is,
per session, its steps that the next session did not replay, at the session's time per step
(between its first and last progress events, checkpoint writes left out): start-up, replayed
steps, checkpoint writes and the time lost to a kill are what goodput leaves out.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

JOURNAL = "journal.jsonl"


class Journal:
    """Appends events to `run_dir/journal.jsonl` (one process writes: rank 0) and keeps them."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / JOURNAL
        self.enabled = enabled
        self.events = read_journal(self.path.parent) if enabled else []
        self._earlier = (0.0, 0.0)  # useful and wall seconds of the sessions before this one
        self._session: dict | None = None  # this session's start, progress span and writes

    def record(self, event: str, **fields) -> dict:
        entry = {"event": event, "time": time.time(), **fields}
        if self.enabled:
            self._append(entry)
            self.events.append(entry)
            self._follow(entry)
        return entry

    def record_for_rank0(self, event: str, **fields) -> dict:
        """Appends one event from another rank's (disabled) journal, where rank 0 cannot: it
        stopped (the hang watchdog's `hang`)."""
        entry = {"event": event, "time": time.time(), **fields}
        self._append(entry)
        return entry

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # one write per line
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _follow(self, entry: dict) -> None:
        """Keep this session's goodput terms up to date, so `goodput` costs the same at any
        length of the run (the earlier sessions are summed once, at this session's start)."""
        kind, session = entry["event"], self._session
        if kind == "start":
            earlier = run_status(self.events)  # this start fixes the steps the last one replayed
            self._earlier = (earlier.useful_seconds, earlier.wall_seconds)
            self._session = {"start": entry, "first": None, "last": None, "inside": 0.0}
            self._session["pending"], self._session["time"] = 0.0, entry["time"]
            return
        if session is None:
            return
        session["time"] = entry["time"]
        if kind == "progress":
            if session["first"] is None:
                session["first"] = entry
            session["inside"] += session["pending"]  # writes between two progress events
            session["pending"], session["last"] = 0.0, entry
        elif kind == "checkpoint" and session["first"] is not None:
            session["pending"] += entry["seconds"]

    def goodput(self) -> float | None:
        """`run_status(events).goodput` of the events recorded so far."""
        session = self._session
        if session is None:
            return run_status(self.events).goodput
        useful, wall = self._earlier
        wall += session["time"] - session["start"]["time"]
        if session["first"] is not None:
            start_step = session["start"].get("step", 0)
            useful += _useful_seconds(
                start_step, session["first"], session["last"], session["inside"]
            )
        return useful / wall if wall > 0 else None


def read_journal(run_dir: str | Path) -> list[dict]:
    """The events of a run directory's journal (a line cut short by a kill is left out)."""
    path = Path(run_dir) / JOURNAL
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


@dataclass
class RunStatus:
    """Where a run stands, from its journal."""

    step: int = 0
    tokens: float | None = None
    losses: list[float] = field(default_factory=list)  # the last logging steps'
    tokens_per_sec: float | None = None
    eta_seconds: float | None = None
    last_checkpoint: str | None = None
    sessions: int = 0
    restarts: int = 0
    hangs: int = 0
    finished: bool = False
    skipped: int = 0
    spikes: int = 0
    checkpoint_seconds: float = 0.0
    wall_seconds: float = 0.0
    useful_seconds: float = 0.0

    @property
    def goodput(self) -> float | None:
        return self.useful_seconds / self.wall_seconds if self.wall_seconds > 0 else None


def _sessions(events: list[dict]) -> list[list[dict]]:
    sessions: list[list[dict]] = []
    for event in events:
        if event.get("event") == "start" or not sessions:
            sessions.append([])
        sessions[-1].append(event)
    return sessions


def _useful_seconds(
    start_step: int, first: dict, last: dict, writes_inside: float, kept_until: int | None = None
) -> float:
    """A session's seconds in steps that counted: its steps from `start_step` to the last
    progress event (or to `kept_until`, where the next session resumed) at its time per step
    between its first and last progress events, checkpoint writes left out."""
    steps = last["step"] - first["step"]
    if steps <= 0:
        return 0.0
    per_step = (last["time"] - first["time"] - writes_inside) / steps
    end = last["step"] if kept_until is None else min(last["step"], kept_until)
    return per_step * max(0, end - start_step)


def run_status(
    events: list[dict], max_steps: int | None = None, now: float | None = None
) -> RunStatus:
    """`RunStatus` of a journal's events; `now` ends an unfinished last session (default: its
    last event); `max_steps` (default: the last session's) is the target of the ETA."""
    status = RunStatus()
    recorded = None  # the last session's max_steps
    sessions = _sessions(events)
    status.sessions = len(sessions)
    for i, session in enumerate(sessions):
        start = session[0]
        ended = any(e.get("event") == "end" for e in session)
        done = any(e.get("event") == "end" and e.get("reason") == "done" for e in session)
        if i + 1 < len(sessions) and not done:
            status.restarts += 1
        status.hangs += any(e.get("event") == "hang" for e in session)  # one per process group
        last_time = session[-1]["time"]
        if i + 1 == len(sessions) and not ended and now is not None:
            last_time = max(last_time, now)
        status.wall_seconds += last_time - start["time"]
        progress = [e for e in session if e.get("event") == "progress"]
        writes = [e for e in session if e.get("event") == "checkpoint"]
        # steps that counted: up to where the next session resumed (later ones were replayed)
        kept_until = sessions[i + 1][0].get("step", 0) if i + 1 < len(sessions) else None
        if len(progress) >= 2:
            first, last = progress[0], progress[-1]
            writes_inside = sum(
                w["seconds"] for w in writes if first["time"] <= w["time"] <= last["time"]
            )
            status.useful_seconds += _useful_seconds(
                start.get("step", 0), first, last, writes_inside, kept_until
            )
        status.checkpoint_seconds += sum(w["seconds"] for w in writes)
    for event in events:
        kind = event.get("event")
        if kind == "progress":
            status.step = event["step"]
            status.tokens = event.get("tokens")
            status.losses = (status.losses + [event.get("loss")])[-5:]
            status.skipped = event.get("skipped", status.skipped)
            status.spikes = event.get("spikes", status.spikes)
        elif kind == "checkpoint":
            status.last_checkpoint = event.get("path")
        elif kind == "start":  # a session continues the run: its max_steps is the target now
            status.step = event.get("step", status.step)
            status.finished = False
            recorded = event.get("max_steps") or recorded
        elif kind == "end":
            status.step = event.get("step", status.step)
            status.finished = event.get("reason") == "done"
    max_steps = max_steps or recorded
    last = [e for e in (sessions[-1] if sessions else []) if e.get("event") == "progress"]
    if len(last) >= 2 and last[-1]["time"] > last[0]["time"] and last[-1].get("tokens"):
        seconds = last[-1]["time"] - last[0]["time"]
        status.tokens_per_sec = (last[-1]["tokens"] - last[0]["tokens"]) / seconds
        steps_per_sec = (last[-1]["step"] - last[0]["step"]) / seconds
        if max_steps and steps_per_sec > 0 and not status.finished:
            status.eta_seconds = max(0, max_steps - status.step) / steps_per_sec
    return status


def describe_status(status: RunStatus, run_dir: str | Path) -> str:
    """The lines `tinyrecipe status` prints."""

    def hours(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 3600:.2f} h"

    losses = " -> ".join(f"{x:.4f}" for x in status.losses if x is not None) or "-"
    rate = "-" if status.tokens_per_sec is None else f"{status.tokens_per_sec:,.0f}"
    goodput = "-" if status.goodput is None else f"{status.goodput:.1%}"
    state = "finished" if status.finished else "not finished"
    return "\n".join(
        [
            f"run {run_dir}: step {status.step:,} ({state})"
            + (f", {status.tokens:,.0f} tokens" if status.tokens is not None else ""),
            f"loss (last logging steps): {losses}",
            f"tokens/s: {rate}; ETA: {hours(status.eta_seconds)}",
            f"last checkpoint: {status.last_checkpoint or '-'}",
            f"sessions: {status.sessions}, restarts: {status.restarts}, hangs: {status.hangs}; "
            f"skipped steps: "
            f"{status.skipped}, spike skips: {status.spikes}",
            f"goodput: {goodput} ({hours(status.useful_seconds)} of steps that counted in "
            f"{hours(status.wall_seconds)} of wall time; checkpoint writes "
            f"{status.checkpoint_seconds:.1f} s)",
        ]
    )

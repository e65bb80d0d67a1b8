"""The hang watchdog: a rank whose run has made no progress for `timeout` seconds prints one line
naming the step and the rank that stopped, and exits (code 3), so that the launcher (torchrun's
elastic agent, a SLURM requeue) restarts the run from its last checkpoint, instead of every rank
waiting in a collective until the process group's timeout.

Progress is a `beat()`: each training and validation batch, each checkpoint written, each batch of
requests a downstream evaluation scores. A daemon thread checks every `interval` seconds. Given a
store (the rendezvous store every rank reaches), it also publishes `<beats> <step>` under
`rank/<r>` each interval, so that when the run stalls every rank tells the rank that stopped (its
heartbeat no longer moves: SIGSTOP, a frozen host, a dead process) from the ranks waiting for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

HANG_EXIT_CODE = 3
DEFAULT_TIMEOUT_S = 600.0  # the recipe key's default (`watchdog.timeout_s`), both loops

_active: Watchdog | None = None


def beat(step: int | None = None) -> None:
    """Progress: resets the active watchdog's clock and step (attribute writes; nothing without
    a watchdog)."""
    watchdog = _active
    if watchdog is not None:
        watchdog.last = time.monotonic()
        if step is not None:
            watchdog.step = step


class Watchdog:
    """One rank's watchdog: `start()` makes it the active one (`beat()` resets it) and starts its
    thread; `stop()` ends both. `on_hang(message)` (the journal) runs before the exit, given 10 s
    at most; `exit` is `os._exit` (tests pass their own)."""

    def __init__(
        self,
        timeout: float,
        *,
        rank: int = 0,
        world_size: int = 1,
        store=None,
        step: int | None = None,
        interval: float | None = None,
        on_hang: Callable[[str], None] | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.timeout = float(timeout)
        self.interval = interval or min(30.0, max(0.2, self.timeout / 5))
        self.rank, self.world_size, self.store = rank, world_size, store
        self.on_hang, self._exit = on_hang, exit
        self.last = time.monotonic()
        self.step = step
        # once a hang is described: the ranks whose heartbeat stopped (None: the store did not
        # answer, so its host, rank 0's process or node, is the one that stopped; [] also when
        # it stopped answering during the description: rank 0's watchdog exited first)
        self.stopped: list[int] | None = []
        self._beats = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if store is not None:
            store.set_timeout(timedelta(seconds=max(1.0, 2 * self.interval)))

    def start(self) -> Watchdog:
        global _active
        self.last = time.monotonic()
        _active = self
        self._publish()  # before the first step: a rank that stops at once is still told apart
        self._thread = threading.Thread(target=self._run, name="tinyrecipe-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        global _active
        if _active is self:
            _active = None
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _stalled(self) -> bool:
        return not self._stopped.is_set() and time.monotonic() - self.last > self.timeout

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._publish()
            if not self._stalled():
                continue
            message = self.describe(time.monotonic() - self.last)
            if not self._stalled():  # progress, or stop(), while the heartbeats were compared
                continue
            try:
                print(message, file=sys.stderr, flush=True)
                self._report(message)
            finally:
                self._exit(HANG_EXIT_CODE)
            return

    def _report(self, message: str) -> None:
        """`on_hang` on a thread of its own, waited for 10 s at most: a hung file system (the
        journal's) must not keep this rank from exiting."""
        if self.on_hang is not None:
            reporter = threading.Thread(target=self.on_hang, args=(message,), daemon=True)
            reporter.start()
            reporter.join(10)

    def _publish(self) -> None:
        self._beats += 1
        if self.store is not None:
            # an unreachable store is what describe() reports
            with contextlib.suppress(Exception):
                self.store.set(f"rank/{self.rank}", f"{self._beats} {self.step}")

    def _heartbeats(self) -> dict[int, str] | None:
        """Every other rank's published heartbeat (None for a rank that never published), or
        None when the store does not answer within `2 * interval` (2 s at least): a client's
        read from a TCPStore whose host process is stopped blocks past the store's timeout,
        so the reads run on a thread of their own, left behind when they do not return."""
        answer: list[dict[int, str | None] | None] = []
        answered = threading.Event()

        def read() -> None:
            found = {}
            try:
                for r in range(self.world_size):
                    if r != self.rank:
                        key = f"rank/{r}"
                        known = self.store.check([key])
                        found[r] = self.store.get(key).decode() if known else None
                answer.append(found)
            except Exception:  # noqa: BLE001 — an unreachable store: no answer
                answer.append(None)
            answered.set()

        threading.Thread(target=read, name="tinyrecipe-heartbeats", daemon=True).start()
        return answer[0] if answered.wait(max(2.0, 2 * self.interval)) else None

    def describe(self, idle: float) -> str:
        """The one line: the step, and which rank stopped when the heartbeats tell."""
        head = f"tinyrecipe: hang: no progress for {idle:.0f} s after step {self.step}"
        tail = f"rank {self.rank} exits ({HANG_EXIT_CODE}) for the launcher to restart the run"
        if self.store is None or self.world_size == 1:
            return f"{head}; {tail}"
        before, after = self._heartbeats(), None
        if before is not None:
            for _ in range(3):  # every live rank publishes at least twice meanwhile, ours included
                time.sleep(self.interval)
                self._publish()
            after = self._heartbeats()
        if before is None:
            self.stopped = None
            return f"{head}; the rendezvous store does not answer (its host stopped); {tail}"
        if after is None:  # it answered a moment ago: its host's own watchdog ended it
            self.stopped = []
            return (
                f"{head}; the rendezvous store stopped answering while the heartbeats were "
                f"compared (rank 0 exited on its own watchdog, which describes the hang); {tail}"
            )

        def step(r: int) -> str:
            return after[r].split()[1] if after[r] else "none"

        stopped = [r for r in sorted(after) if after[r] is None or after[r] == before[r]]
        self.stopped = stopped
        if stopped:
            said = ", ".join(f"rank {r} (after step {step(r)})" for r in stopped)
            return f"{head}; stopped: {said}; {tail}"
        steps = {r: step(r) for r in after} | {self.rank: str(self.step)}
        if len(set(steps.values())) > 1:  # alive, but a step behind the others: stuck there
            low = min(steps.values(), key=lambda s: int(s) if s.isdigit() else -1)
            said = ", ".join(f"rank {r}" for r, s in sorted(steps.items()) if s == low)
            return f"{head}; no rank stopped; behind, after step {low}: {said}; {tail}"
        return f"{head}; every rank is alive at this step (a collective or I/O waits); {tail}"

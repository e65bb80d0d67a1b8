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

_active: Watchdog | None = None


def beat(step: int | None = None) -> None:
    """Progress: resets the active watchdog's clock (one attribute write; none without one)."""
    watchdog = _active
    if watchdog is not None:
        watchdog.last = time.monotonic()
        if step is not None:
            watchdog.step = step


class Watchdog:
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

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._publish()
            idle = time.monotonic() - self.last
            if idle > self.timeout and not self._stopped.is_set():
                message = self.describe(idle)
                print(message, file=sys.stderr, flush=True)
                if self.on_hang is not None:
                    self.on_hang(message)
                self._exit(HANG_EXIT_CODE)
                return

    def _publish(self) -> None:
        self._beats += 1
        if self.store is not None:
            # an unreachable store is what describe() reports
            with contextlib.suppress(Exception):
                self.store.set(f"rank/{self.rank}", f"{self._beats} {self.step}")

    def _heartbeats(self) -> dict[int, str] | None:
        """Every other rank's published heartbeat (None for a rank that never published), or
        None when the store does not answer."""
        try:
            found = {}
            for r in range(self.world_size):
                if r != self.rank:
                    key = f"rank/{r}"
                    found[r] = self.store.get(key).decode() if self.store.check([key]) else None
            return found
        except Exception:  # noqa: BLE001 — the store's host itself stopped
            return None

    def describe(self, idle: float) -> str:
        """The one line: the step, and which rank stopped when the heartbeats tell."""
        head = f"tinyrecipe: hang: no progress for {idle:.0f} s after step {self.step}"
        tail = f"rank {self.rank} exits ({HANG_EXIT_CODE}) for the launcher to restart the run"
        if self.store is None or self.world_size == 1:
            return f"{head}; {tail}"
        before = self._heartbeats()
        time.sleep(1.5 * self.interval)  # every live rank publishes at least once meanwhile
        self._publish()
        after = self._heartbeats()
        if before is None or after is None:
            return f"{head}; the rendezvous store does not answer (its host stopped); {tail}"
        stopped = [r for r in sorted(after) if after[r] is None or after[r] == before[r]]
        if not stopped:
            return f"{head}; every rank is alive and waiting (none stopped); {tail}"

        def said(r: int) -> str:
            return f"rank {r} (after step {after[r].split()[1]})" if after[r] else f"rank {r}"

        return f"{head}; stopped: {', '.join(map(said, stopped))}; {tail}"

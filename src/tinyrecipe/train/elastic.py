"""Runs under a launcher that restarts them: torchrun's elastic agent (`--max-restarts`).

torchrun (torch 2.x) hands every restart of a worker group the same rendezvous store
(`TORCHELASTIC_USE_AGENT_STORE=True`) with the previous attempt's keys still in it, so a restarted
rank reads a dead peer's address from it (gloo: "connectFullMesh failed ... Connection refused";
NCCL: a stale unique id) and the restart is lost (pytorch/pytorch#135712). `init_process_group`
starts the default process group on that store under a prefix of the restart number, which the
one agent of a node counts for all its workers, and the world size (a node joining an elastic
job restarts the workers without counting a restart). Agents of several nodes count restarts each for
their own workers, so on several nodes the store must not be shared: `export
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` before torchrun (each round then gets a fresh store), which
`init_process_group` asks for in one line when restarts are allowed.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tinyrecipe._lightning import process_group_settings
from tinyrecipe.watchdog import Watchdog


def restart_count() -> int:
    """torchrun's count of this worker group's restarts (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _shared_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def check_restartable() -> None:
    """Refuses, in one line, restarts that would read stale addresses: several nodes sharing the
    agents' store with `--max-restarts` above 0."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if _shared_agent_store() and nodes > 1 and restarts > 0:
        raise ValueError(
            f"torchrun --max-restarts {restarts} on {nodes} nodes: export "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, or a restarted group reads "
            "the previous attempt's addresses (docs/reliability.md, long runs)"
        )


def rendezvous_store(namespace: str, timeout: timedelta, world_size: int) -> dist.Store | None:
    """A client of the run's rendezvous store (MASTER_ADDR:MASTER_PORT: torchrun's agent, or
    rank 0 under Lightning's launchers and SLURM) under `tinyrecipe/<namespace>`, and under
    torchrun's shared store `tinyrecipe/restart-<n>-of-<world size>/<namespace>` (elsewhere each restart has a
    fresh store, and the agents of several nodes count restarts differently); None in a single
    process."""
    if world_size < 2 or "MASTER_PORT" not in os.environ:
        return None
    client = dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
        wait_for_workers=False,
    )
    # a node joining an elastic job restarts the workers without counting a restart: the world
    # size tells that round from the one before
    restart = f"restart-{restart_count()}-of-{world_size}/" if _shared_agent_store() else ""
    return dist.PrefixStore(f"tinyrecipe/{restart}{namespace}", client)


def init_process_group(strategy) -> bool:
    """Under torchrun's shared store, starts the default process group for `strategy` (its
    backend and timeout, as Lightning would) on a store fresh to this restart; Lightning then
    finds it started. Elsewhere, or when already started, does nothing. True when it started it."""
    check_restartable()
    settings = process_group_settings(strategy)
    if not _shared_agent_store() or dist.is_initialized() or settings is None:
        return False
    backend, timeout = settings
    device = strategy.root_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        backend,
        store=rendezvous_store("process-group", timeout, world_size),
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=timeout,
        device_id=device if device.type != "cpu" else None,
    )
    if backend == "nccl":  # as Lightning does: torch warns of an NCCL group left at exit
        atexit.register(dist.destroy_process_group)
    return True


def start_watchdog(
    timeout_s: float | None,
    interval_s: float | None,
    *,
    rank: int,
    world_size: int,
    step: int,
    journal=None,
) -> Watchdog | None:
    """A started hang watchdog (`tinyrecipe.watchdog`) for this rank, with the run's rendezvous
    store for the heartbeats and `journal` (this rank's: rank 0's writes) for the `hang` event
    (`record_hang`); None when `timeout_s` is None. Both loops start theirs here."""
    if timeout_s is None:
        return None
    watchdog = Watchdog(
        timeout_s,
        rank=rank,
        world_size=world_size,
        store=rendezvous_store("watchdog", timedelta(seconds=60), world_size),
        step=step,
        interval=interval_s,
    )
    watchdog.on_hang = lambda message: record_hang(journal, watchdog, message)
    return watchdog.start()


def record_hang(journal, watchdog: Watchdog, message: str) -> None:
    """The `hang` event in `journal`: rank 0 records it. When rank 0 is among the ranks that
    stopped, the lowest rank that did not records it instead; when the store did not answer
    (its host stopped: rank 0's process, or under torchrun the first node's agent), rank 1."""
    if journal is None:
        return
    fields = dict(step=watchdog.step, message=message, rank=watchdog.rank)
    stopped = watchdog.stopped
    if watchdog.rank == 0:
        journal.record("hang", **fields)
    elif stopped is None or 0 in stopped:
        gone = [0] if stopped is None else stopped  # no answer: the store's host, rank 0
        first_live = next(r for r in range(watchdog.world_size) if r not in gone)
        if watchdog.rank == first_live:
            journal.record_for_rank0("hang", **fields)

"""The hang watchdog and the restart-safe start under torchrun, without processes: a stalled
rank names the rank whose heartbeat stopped; progress keeps it quiet; restarts that would read
stale addresses are refused in one line; failpoint specs pick a rank and an attempt."""

import threading
import time
from functools import partial

import pytest
import torch.distributed as dist

from tinyrecipe import faults, watchdog
from tinyrecipe.train.elastic import check_restartable, init_process_group, record_hang
from tinyrecipe.train.journal import Journal, read_journal, run_status


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def observer(store, world_size: int, hangs: list, exit) -> watchdog.Watchdog:
    """Rank 0's watchdog at step 5, unstarted: 0.3 s without progress is a hang."""
    return watchdog.Watchdog(
        0.3,
        rank=0,
        world_size=world_size,
        store=store,
        step=5,
        interval=0.05,
        on_hang=hangs.append,
        exit=exit,
    )


def test_a_stalled_rank_names_the_rank_that_stopped():
    store, exits, hangs = dist.HashStore(), [], []
    # rank 1 publishes once (its start) and then stops, as a SIGSTOPped process would
    watchdog.Watchdog(1, rank=1, world_size=3, store=store, step=4)._publish()
    live = watchdog.Watchdog(60, rank=2, world_size=3, store=store, step=5, interval=0.05).start()
    mine = observer(store, 3, hangs, exits.append).start()
    wait_for(lambda: exits)
    mine.stop(), live.stop()
    assert exits == [watchdog.HANG_EXIT_CODE]
    (line,) = hangs
    assert line.startswith("tinyrecipe: hang: no progress for 0 s after step 5")
    assert "stopped: rank 1 (after step 4);" in line and "rank 2" not in line


def test_when_rank_0_stopped_the_first_live_rank_records_the_hang(tmp_path):
    """The `hang` journal event: rank 0 stopped (SIGSTOP, a frozen host), so rank 1, the lowest
    rank still running, appends it to the run's journal; rank 2 records nothing."""
    store = dist.HashStore()
    watchdog.Watchdog(1, rank=0, world_size=3, store=store, step=4)._publish()  # then stops
    dogs = []
    for rank in (1, 2):
        journal = Journal(tmp_path, enabled=False)  # a rank other than 0: journal off
        dog = watchdog.Watchdog(0.3, rank=rank, world_size=3, store=store, step=5, interval=0.05)
        dog.on_hang, dog._exit = partial(record_hang, journal, dog), lambda code: None
        dogs.append(dog.start())
    for dog in dogs:
        dog._thread.join(10)  # each found the hang, recorded it or not, and "exited"
        dog.stop()
    (event,) = read_journal(tmp_path)
    assert event["event"] == "hang" and event["rank"] == 1 and event["step"] == 5
    assert "stopped: rank 0 (after step 4)" in event["message"]
    assert run_status(read_journal(tmp_path)).hangs == 1


def test_a_store_that_no_longer_answers_ends_the_run_and_rank_1_records_it(tmp_path):
    """A read from a TCPStore whose host process is stopped (rank 0's, under Lightning's
    launchers and SLURM) blocks past the store's timeout: the watchdog stops waiting for the
    heartbeats, says the store does not answer and exits; rank 1 records the hang."""
    release, exits = threading.Event(), []

    class Frozen:  # writes go out; reads never come back
        def set_timeout(self, timeout):
            pass

        def set(self, key, value):
            pass

        def check(self, keys):
            release.wait()

        get = check

    dogs = []
    for rank in (1, 2):
        dog = watchdog.Watchdog(0.3, rank=rank, world_size=3, store=Frozen(), step=5, interval=0.05)
        dog.on_hang = partial(record_hang, Journal(tmp_path, enabled=False), dog)
        dog._exit = exits.append
        dogs.append(dog.start())
    for dog in dogs:
        dog._thread.join(10)
        dog.stop()
    release.set()
    assert exits == [watchdog.HANG_EXIT_CODE] * 2
    (event,) = read_journal(tmp_path)
    assert event["rank"] == 1 and "the rendezvous store does not answer" in event["message"]


def test_a_store_gone_while_its_host_describes_the_same_hang_is_not_blamed(tmp_path):
    """Every rank hung alike: rank 0 (the store's host) describes the hang and exits while rank 1
    compares heartbeats, so the store answers once, then not. Rank 1 says so and records no
    second hang (rank 0 recorded it)."""
    store, reads = dist.HashStore(), []

    class Vanishing:  # answers the first round of reads, then its host is gone
        def set_timeout(self, timeout):
            pass

        def set(self, key, value):
            store.set(key, value)

        def check(self, keys):
            reads.append(keys)
            if len(reads) > 2:
                raise RuntimeError("Connection reset by peer")
            return store.check(keys)

        def get(self, key):
            return store.get(key)

    store.set("rank/0", "7 5")
    store.set("rank/2", "7 5")
    dog = watchdog.Watchdog(60, rank=1, world_size=3, store=Vanishing(), step=5, interval=0.01)
    message = dog.describe(61)
    assert "stopped answering while the heartbeats were compared" in message, message
    assert dog.stopped == []
    record_hang(Journal(tmp_path, enabled=False), dog, message)
    assert read_journal(tmp_path) == []


def test_a_rank_alive_but_behind_is_named():
    store, hangs = dist.HashStore(), []
    behind = watchdog.Watchdog(60, rank=1, world_size=2, store=store, step=3, interval=0.05)
    behind.start()
    mine = observer(store, 2, hangs, exit=lambda code: None)
    watchdog._active = None  # rank 1's clock is its own: it keeps beating (alive, stuck at 3)
    mine.start()
    deadline = time.monotonic() + 10
    while not hangs and time.monotonic() < deadline:
        behind.last = time.monotonic()
        time.sleep(0.02)
    mine.stop(), behind.stop()
    assert "no rank stopped; behind, after step 3: rank 1;" in hangs[0], hangs


def test_progress_keeps_the_watchdog_quiet():
    exits = []
    dog = watchdog.Watchdog(0.3, interval=0.05, exit=exits.append).start()
    for step in range(15):
        watchdog.beat(step)
        time.sleep(0.05)
    dog.stop()
    assert exits == [] and dog.step == 14 and watchdog._active is None
    watchdog.beat(99)  # no watchdog: nothing happens


def test_without_a_store_the_line_names_this_rank():
    hangs = []
    dog = watchdog.Watchdog(0.1, step=3, interval=0.05, on_hang=hangs.append, exit=lambda c: None)
    dog.start()
    wait_for(lambda: hangs)
    dog.stop()
    assert hangs[0].endswith("after step 3; rank 0 exits (3) for the launcher to restart the run")


def test_restarts_on_several_nodes_sharing_the_agent_store_are_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with pytest.raises(ValueError, match="export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_restartable()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    check_restartable()
    assert init_process_group(object()) is False  # not torchrun's shared store: Lightning starts it


def test_each_restart_and_world_size_gets_fresh_keys_in_the_shared_store(monkeypatch):
    """torchrun's agent store outlives the worker groups: a restart (counted) and a node joining
    an elastic job (not counted, a larger world) each start under keys of their own."""
    from datetime import timedelta

    from tinyrecipe.train.elastic import rendezvous_store

    host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(host.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for count, world in (("0", 8), ("1", 8), ("1", 16)):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
        rendezvous_store("process-group", timedelta(seconds=5), world).set(
            "addr", f"{count}/{world}"
        )
    keys = [
        f"tinyrecipe/restart-{c}-of-{w}/process-group/addr" for c, w in ((0, 8), (1, 8), (1, 16))
    ]
    assert [host.get(k).decode() for k in keys] == ["0/8", "1/8", "1/16"]


def test_failpoint_specs_pick_a_rank_and_an_attempt(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert faults._matches("train.after_backward:5@1#2", "train.after_backward") == 5
    assert faults._matches("train.after_backward:5@0#2", "train.after_backward") is None
    assert faults._matches("train.after_backward:5@1#0", "train.after_backward") is None
    assert faults._matches("val.batch", "val.batch") == 1
    assert faults._matches("val.batch:2", "train.after_backward") is None


def test_a_session_that_failed_or_hung_then_started_again_is_a_restart():
    events = [
        {"event": "start", "time": 0, "step": 0},
        {"event": "end", "time": 5, "step": 3, "reason": "RuntimeError"},
        {"event": "start", "time": 6, "step": 2},
        {"event": "hang", "time": 9, "step": 4, "message": "..."},
        {"event": "start", "time": 10, "step": 4},
        {"event": "end", "time": 12, "step": 6, "reason": "done"},
    ]
    status = run_status(events)
    assert (status.sessions, status.restarts, status.hangs, status.finished) == (3, 2, 1, True)


def test_the_final_checkpoint_is_written_under_the_watchdog(corpus, tmp_path, monkeypatch):
    """A run ending between two periodic checkpoints writes its final one in the checkpoint
    callback's on_train_end, after the other callbacks' (Lightning runs checkpoint callbacks
    last): the watchdog still watches it."""
    from tests.test_training import write_recipe
    from tinyrecipe.cli import main as cli_main
    from tinyrecipe.train import callbacks

    watched = []
    final_save = callbacks.Checkpoints.on_train_end

    def on_train_end(self, trainer, pl_module):
        watched.append(watchdog._active is not None)
        final_save(self, trainer, pl_module)

    monkeypatch.setattr(callbacks.Checkpoints, "on_train_end", on_train_end)
    recipe = write_recipe(tmp_path, corpus, max_steps=3, every=2)
    assert cli_main(["fit", "--config", str(recipe)]) == 0
    assert watched == [True] and watchdog._active is None
    assert (tmp_path / "checkpoints/step=3.ckpt").is_file()

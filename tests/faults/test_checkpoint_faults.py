"""Checkpoint writes cut at random byte offsets, an unreadable last.ckpt, and a full disk."""

import errno
import random

import pytest
import torch

from tinyrecipe.checkpoint import AtomicCheckpointIO

pytestmark = pytest.mark.faults


def state(step: int) -> dict:
    torch.manual_seed(step)
    return {"global_step": step, "state_dict": {"model.w": torch.randn(64, 64)}}


class CutAfter:
    """A file that fails with `error` once `limit` bytes have been written to it."""

    def __init__(self, f, limit: int, error: OSError) -> None:
        self.f, self.left, self.fault, self.error = f, limit, error, None

    def write(self, data) -> int:
        if len(data) > self.left:
            self.f.write(bytes(data)[: self.left])
            self.error = self.fault
            raise self.fault
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_write_cut_at_any_offset_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(state(1), last)
    size = last.stat().st_size
    import tinyrecipe.checkpoint.resume as ckpt_module

    for offset in sorted(random.Random(0).sample(range(1, size), 12)):
        monkeypatch.setattr(
            ckpt_module,
            "_Failpointed",
            lambda f, o=offset: CutAfter(f, o, OSError(errno.EIO, "I/O")),
        )
        with pytest.raises(OSError):
            io.save_checkpoint(state(2), last)
        loaded = io.load_checkpoint(last)
        assert loaded["global_step"] == 1 and torch.equal(
            loaded["state_dict"]["model.w"], state(1)["state_dict"]["model.w"]
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "temp file left"


def test_disk_full_is_one_clear_error_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    import tinyrecipe.checkpoint.resume as ckpt_module

    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(state(1), last)
    monkeypatch.setattr(
        ckpt_module,
        "_Failpointed",
        lambda f: CutAfter(f, 1000, OSError(errno.ENOSPC, "No space left on device")),
    )
    with pytest.raises(OSError, match="no space left to write checkpoint .*last.ckpt.*free disk"):
        io.save_checkpoint(state(2), last)
    assert io.load_checkpoint(last)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_an_unreadable_last_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    io, heard = AtomicCheckpointIO(), []
    io.on_fallback = lambda *args: heard.append(args)
    io.save_checkpoint(state(4), tmp_path / "step=4.ckpt")
    io.save_checkpoint(state(8), tmp_path / "epoch=0-step=8.ckpt")
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(state(8), last)
    # step 8's file is damaged too (same disk fault): the newest readable one is step 4
    for damaged in (last, tmp_path / "epoch=0-step=8.ckpt"):
        damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.warns(UserWarning, match=r"last.ckpt' is unreadable .*'step=4.ckpt' \(step 4\)"):
        assert io.load_checkpoint(last)["global_step"] == 4
    assert [(a.name, b.name) for a, b, _ in heard] == [("last.ckpt", "step=4.ckpt")]  # journal
    (tmp_path / "step=4.ckpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="unreadable .* no other checkpoint beside it loads") as no:
        io.load_checkpoint(last)
    assert len(str(no.value)) < 300 and "\n" not in str(no.value)  # not torch's whole advice


def _sharded(path, value: float) -> None:
    """A sharded checkpoint as FSDP2Strategy writes it: DCP shards, .metadata, meta.pt."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.full((64, 64), value)}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": int(value)}, path / "meta.pt")


def _load_sharded(path):
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.zeros(64, 64)}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return {"global_step": torch.load(path / "meta.pt")["global_step"], "w": state["w"]}


@pytest.mark.parametrize("damage", ["cut", "deleted", "metadata", "zeroed"])
def test_a_damaged_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    """A shard cut short or deleted, a garbled .metadata (each seen before loading), or a shard
    of the right size with damaged bytes (seen by DCP's load): the previous one loads, said in
    one short line."""
    import os

    from tinyrecipe.checkpoint import load_with_fallback

    for step in (3, 6, 9):
        _sharded(tmp_path / f"step={step}.ckpt", float(step))
        os.utime(tmp_path / f"step={step}.ckpt", (step, step))
    newest = tmp_path / "step=9.ckpt"
    shard = next(newest.glob("*.distcp"))
    if damage == "cut":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "deleted":
        shard.unlink()
    elif damage == "metadata":
        (newest / ".metadata").write_bytes(b"garbled")
    else:
        shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.warns(UserWarning) as said:
        result = load_with_fallback(newest, _load_sharded)
    assert result["global_step"] == 6 and torch.equal(result["w"], torch.full((64, 64), 6.0))
    message = next(str(w.message) for w in said if "is unreadable" in str(w.message))
    assert "'step=6.ckpt' (step 6)" in message and len(message) < 300, message


def test_auto_resume_picks_the_newest_whole_checkpoint_last_first(tmp_path):
    import os

    from tinyrecipe.checkpoint import resolve_auto_resume

    assert resolve_auto_resume(tmp_path / "none") is None and resolve_auto_resume(tmp_path) is None
    io = AtomicCheckpointIO()
    for step in (2, 4):
        io.save_checkpoint(state(step), tmp_path / f"step={step}.ckpt")
        os.utime(tmp_path / f"step={step}.ckpt", (step, step))
    assert resolve_auto_resume(tmp_path) == str(tmp_path / "step=4.ckpt")
    _sharded(tmp_path / "step=6.ckpt", 6.0)  # newer, but a shard is gone
    next((tmp_path / "step=6.ckpt").glob("*.distcp")).unlink()
    assert resolve_auto_resume(tmp_path) == str(tmp_path / "step=4.ckpt")
    os.symlink("step=2.ckpt", tmp_path / "last.ckpt")  # killed before the link moved on
    assert resolve_auto_resume(tmp_path) == str(tmp_path / "step=4.ckpt")
    (tmp_path / "last.ckpt").unlink()
    os.symlink("step=4.ckpt", tmp_path / "last.ckpt")
    assert resolve_auto_resume(tmp_path) == str(tmp_path / "last.ckpt")


def test_every_rank_falls_back_when_one_rank_cannot_read_the_file(tmp_path):
    """DDP: each rank reads the file; `any_failed` (the ranks' reduction) says another rank's
    read failed, so this rank falls back too, to the same older checkpoint."""
    import os

    io = AtomicCheckpointIO()
    for step in (2, 4):
        io.save_checkpoint(state(step), tmp_path / f"step={step}.ckpt")
        os.utime(tmp_path / f"step={step}.ckpt", (step, step))
    answers = iter([False, True])  # step 4: whole here, unreadable on another rank
    io.any_failed = lambda failed: next(answers, failed)
    with pytest.warns(UserWarning, match="unreadable on another rank"):
        assert io.load_checkpoint(tmp_path / "step=4.ckpt")["global_step"] == 2

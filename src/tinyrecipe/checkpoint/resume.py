"""Checkpoint files that are whole or absent: a save killed mid-write never leaves a broken
`last.ckpt` (Lightning's own writer opens the final path directly), a full disk is one clear
error with the previous checkpoint intact, and an unreadable `last.ckpt` (a disk fault, a copy
cut short) falls back to the newest readable checkpoint beside it, saying so."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from tinyrecipe._lightning import SHARDED_METADATA_FILE
from tinyrecipe.faults import failpoint
from tinyrecipe.io import atomic_path, remove_stale, short_reason

T = TypeVar("T")


class _Failpointed:
    """A file whose every write() is a failpoint (the fault suite kills mid-write there), and
    which keeps the OSError of a failed write (torch.save reports it as a RuntimeError)."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        failpoint("checkpoint.write")
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file I/O through a temporary file, an fsync and a rename
    (`tinyrecipe.io`), loading with `weights_only` and the fall-back above. `on_write(path,
    seconds)` and `on_fallback(path, used, why)`, when set (the run journal), hear of each file
    written and of a damaged checkpoint passed over; `any_failed` (set by `Checkpoints` to a
    reduction over the ranks) makes every rank of a DDP run fall back alike."""

    on_write: Callable[[Path, float], None] | None = None
    on_fallback: Callable[[Path, Path, str], None] | None = None
    any_failed: Callable[[bool], bool] = staticmethod(bool)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        remove_stale(path)  # left by a save that was killed
        start = time.perf_counter()
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                out = _Failpointed(f)
                try:
                    torch.save(checkpoint, out)
                except RuntimeError:
                    if out.error is not None:  # the disk's error, not torch's rewording of it
                        raise out.error from None
                    raise
                f.flush()
                os.fsync(f.fileno())
                failpoint("checkpoint.rename")
        except OSError as err:
            raise _disk_error(err, path) from None
        if self.on_write is not None:
            self.on_write(path, time.perf_counter() - start)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        refuse_sharded(Path(path))
        # Checkpoints may come from elsewhere: never unpickle arbitrary objects.
        kwargs = {} if map_location is None else {"map_location": map_location}
        return load_with_fallback(
            Path(path),
            lambda p: super(AtomicCheckpointIO, self).load_checkpoint(
                p, weights_only=True, **kwargs
            ),
            any_failed=self.any_failed,
            on_fallback=self.on_fallback,
        )


def _disk_error(err: OSError, path: Path) -> OSError:
    """A full disk as one clear sentence; any other OSError as it is."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(
            err.errno,
            f"no space left to write checkpoint '{path}' (the previous checkpoints are intact); "
            "free disk space or lower ModelCheckpoint save_top_k, then resume with --ckpt_path last",
        )
    return err


def sharded_problem(path: Path) -> str | None:
    """What keeps a sharded checkpoint directory from loading, found without loading it: DCP's
    index (`.metadata`) or Lightning's `meta.pt` missing, the index unreadable, or a shard file
    it names missing or shorter than the last byte it reads there. None: it looks whole."""
    from torch.distributed.checkpoint import FileSystemReader

    name = path.resolve().name
    for meta in (".metadata", SHARDED_METADATA_FILE):
        if not (path / meta).is_file():
            return f"'{name}/{meta}' is missing"
    try:
        ends: dict[str, int] = {}
        for info in FileSystemReader(path).read_metadata().storage_data.values():
            ends[info.relative_path] = max(
                ends.get(info.relative_path, 0), info.offset + info.length
            )
    except Exception as err:  # garbled: unpickling fails, or not DCP's metadata
        return f"'{name}/.metadata' is unreadable ({type(err).__name__})"
    for shard, end in sorted(ends.items()):
        if not (path / shard).is_file():
            return f"'{name}/{shard}' is missing"
        if (size := (path / shard).stat().st_size) < end:
            return f"'{name}/{shard}' is cut short ({size} of {end} bytes)"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be loaded, seen without loading it; None when it may load."""
    if path.is_dir():
        return sharded_problem(path)
    return None if path.is_file() else f"'{path.name}' is not a file"


def refuse_sharded(path: Path) -> None:
    """A sharded (FSDP2) checkpoint directory given to a strategy that reads one file: one line
    saying how to resume it, instead of 'Is a directory' or a fall-back to an older checkpoint."""
    if path.is_dir() and (path / ".metadata").is_file():
        raise ValueError(
            f"checkpoint '{path}' is sharded (written under FSDP2); resume it with "
            "trainer.strategy: fsdp2, on any number of devices"
        )


def load_with_fallback(
    path: Path,
    load: Callable[[Path], T],
    any_failed: Callable[[bool], bool] = bool,
    on_fallback: Callable[[Path, Path, str], None] | None = None,
) -> T:
    """`load(path)`; if `path` is unreadable (a disk fault, a copy cut short, a shard missing or
    cut, a garbled index), `load` of the newest other checkpoint beside it that loads, with a
    one-line warning and `on_fallback(path, other, why)` (the run journal). A missing `path` is an
    error: nothing to fall back from. `any_failed` (for sharded checkpoints, a reduction over the
    ranks) makes every rank judge each candidate alike, so all of them load the same one; the
    default judges this process alone."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")

    def attempt(candidate: Path) -> tuple[T | None, str | None]:
        why = checkpoint_problem(candidate)
        if any_failed(why is not None):
            return None, why or "unreadable on another rank"
        try:
            result, why = load(candidate), None
        except (Exception, CheckpointException) as err:  # damaged in any way: try the next
            result, why = None, short_reason(err)
        if any_failed(why is not None):
            return None, why or "unreadable on another rank"
        return result, None

    result, why = attempt(path)
    if why is None:
        return result
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.exists() and p.resolve() != path.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in others:
        result, _ = attempt(other)
        if result is not None:
            step = result.get("global_step") if isinstance(result, dict) else None
            rank_zero_warn(
                f"checkpoint '{path}' is unreadable ({why}); resuming from the newest readable "
                f"one beside it, '{other.name}' (step {step})"
            )
            if on_fallback is not None:
                on_fallback(path, other, why)
            return result
    raise ValueError(
        f"checkpoint '{path}' is unreadable ({why}) and no other checkpoint beside it loads; "
        "start without --ckpt_path"
    )


def resolve_auto_resume(directory: Path | None) -> str | None:
    """`--ckpt_path auto`: the run directory's `last.ckpt` when it exists (a damaged one falls
    back when loaded, `load_with_fallback`), unless a whole checkpoint beside it is newer than
    the one it names (a kill between a checkpoint's write and the link's move); else its newest
    whole checkpoint; else None: a fresh start. A pure function of the directory, so every rank
    decides alike."""
    if directory is None or not directory.is_dir():
        return None
    last = directory / "last.ckpt"
    present = (p for p in directory.glob("*.ckpt") if p.exists() and p != last)
    candidates = sorted(present, key=lambda p: p.stat().st_mtime, reverse=True)
    if last.exists():  # a dangling link is not
        linked = last.stat().st_mtime
        candidates = [p for p in candidates if p.stat().st_mtime > linked]
    newest = next((str(p) for p in candidates if checkpoint_problem(p) is None), None)
    return newest or (str(last) if last.exists() else None)


def refuse_new_run_into(dirpath: Path | None, resume: str = "--ckpt_path last") -> None:
    """A new run into a directory of another run's checkpoints would interleave the two."""
    if dirpath is not None and any(Path(dirpath).glob("*.ckpt")):
        raise ValueError(
            f"'{dirpath}' holds checkpoints of an earlier run; resume it with "
            f"{resume}, or set another trainer.default_root_dir (or delete them)"
        )


def check_fit_start(trainer, module, ckpt_path: str | None) -> None:
    """The refusals of a run that can be made before anything is written (the logger's files,
    the recipe's copy, a sanity validation's point): a new run into a directory of another run's
    checkpoints, a `--ckpt_path` that does not exist (`last` with no checkpoint to resume: `auto`
    is resume-or-start), a checkpoint of another model shape or LoRA
    setting, an `init_from` that does not exist. A checkpoint that cannot be read here is left to
    the fall-back of `load_with_fallback`."""
    from tinyrecipe.checkpoint import checkpoint_meta

    callback = trainer.checkpoint_callback
    dirpath = Path(callback.dirpath) if callback is not None and callback.dirpath else None
    init_from = module.hparams.get("init_from")
    if init_from and not Path(init_from).exists():
        raise FileNotFoundError(f"model.init_from '{init_from}' does not exist")
    if ckpt_path is None:
        if any(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")):
            return  # a SLURM requeue: Lightning resumes its own hpc checkpoint
        refuse_new_run_into(dirpath)
        return
    if ckpt_path in ("best", "hpc", "registry") or "://" in str(ckpt_path):
        return
    path = dirpath / "last.ckpt" if ckpt_path == "last" and dirpath else Path(ckpt_path)
    if not path.exists():
        if ckpt_path == "last":
            raise FileNotFoundError(
                f"nothing to resume with --ckpt_path last: no checkpoint in '{dirpath}'; "
                "--ckpt_path auto resumes when there is one and starts the run when there is none"
            )
        raise FileNotFoundError(f"checkpoint '{path}' (--ckpt_path) does not exist")
    try:
        hparams = (checkpoint_meta(path) or {}).get("hyper_parameters")
    except Exception:  # unreadable: load_with_fallback decides
        return
    if hparams is not None:
        module.check_resume(hparams)

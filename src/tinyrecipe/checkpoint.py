"""Checkpoint files that are whole or absent: a save killed mid-write never leaves a broken
`last.ckpt` (Lightning's own writer opens the final path directly), a full disk is one clear
error with the previous checkpoint intact, and an unreadable `last.ckpt` (a disk fault, a copy
cut short) falls back to the newest readable checkpoint beside it, saying so."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from tinyrecipe.faults import failpoint


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
    """Write to `<path>.tmp-<pid>`, fsync, then rename over the target (atomic on POSIX)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{path.name}.tmp-*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        out = None
        try:
            with open(tmp, "wb") as f:
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
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(
                    err.errno,
                    f"no space left to write checkpoint '{path}' (the previous checkpoints are "
                    "intact); free disk space or lower ModelCheckpoint save_top_k, then resume "
                    "with --ckpt_path last",
                ) from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Checkpoints may come from elsewhere: never unpickle arbitrary objects.
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=True, **kwargs)
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            fallback = _newest_readable_sibling(Path(path), kwargs)
            if fallback is None:
                raise ValueError(
                    f"checkpoint '{path}' is unreadable ({type(err).__name__}: {err}) and no "
                    "other checkpoint beside it loads; start without --ckpt_path"
                ) from None
            other, checkpoint = fallback
            rank_zero_warn(
                f"checkpoint '{path}' is unreadable ({type(err).__name__}); resuming from the "
                f"newest readable one beside it, '{other.name}' (step {checkpoint.get('global_step')})"
            )
            return checkpoint


def _newest_readable_sibling(path: Path, kwargs: dict) -> tuple[Path, dict] | None:
    """The newest other *.ckpt file in path's directory that loads, by modification time."""
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p != path and p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in others:
        try:
            return other, torch.load(other, weights_only=True, **kwargs)
        except Exception:  # unreadable too: try the next older one
            continue
    return None

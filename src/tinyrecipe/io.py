"""Files and directories that are whole or absent. Everything tinyrecipe writes for a user to read
back (checkpoints, prepared data, tokenizers, exports, recipes) is built under a temporary
sibling name and renamed into place only when complete, so a killed process or a full disk never
leaves a half-written file where a good one was."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinyrecipe.faults import failpoint


def temp_sibling(path: str | Path, tag: str | int | None = None) -> Path:
    """`.<name>.tmp-<tag>` beside `path` (tag: this process's id unless given; processes that
    write one directory together pass a tag they share)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if tag is None else tag}")


def remove(path: str | Path) -> None:
    """Delete a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(path: str | Path) -> None:
    """Delete what killed writers of `path` left beside it (`.<name>.tmp-*`, `.<name>.old-*`)."""
    path = Path(path)
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            remove(stale)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move the finished `tmp` to `path`, replacing what is there. A file is one atomic rename; a
    directory cannot be swapped in one step, so the old one is renamed aside first and deleted
    only once the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path, tag: str | int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file or a directory); when the block ends
    without an error it replaces `path`, otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, tag)
    remove(tmp)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        remove(tmp)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through a temporary file and an fsync."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def short_reason(err: BaseException) -> str:
    """An error in one short line: its type and first sentence (torch's advice after it left
    out); for DCP's CheckpointException, whose text holds every failing rank's traceback, the
    first failing rank's error."""
    rank = ""
    if failures := getattr(err, "failures", None):  # {rank: (exception, traceback)}
        first, (err, _) = min(failures.items())
        rank = f"rank {first}: "
    text = str(err).splitlines()[0].split(". ")[0] if str(err) else ""
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{rank}{type(err).__name__}: {text}"


def link(target: str | Path, path: str | Path) -> None:
    """Point the symlink `path` at `target` (relative, in the same directory) in one atomic
    rename: the new link is made beside it and renamed over it, so `path` always exists and
    always names a whole checkpoint. A directory (not a link) at `path` is deleted first."""
    path = Path(path)
    tmp = temp_sibling(path)
    remove(tmp)
    os.symlink(os.path.relpath(target, path.parent), tmp)
    failpoint("checkpoint.link")
    if path.is_dir() and not path.is_symlink():
        remove(path)
    os.replace(tmp, path)

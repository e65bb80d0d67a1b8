"""Failpoints for the fault-injection suite (`tests/faults/`).

`TINYRECIPE_KILL_AT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches
`failpoint("<point>")` — a real kill at an exact place, not a timing guess. Unset (always,
outside the tests) a failpoint is one environment lookup. The points:

    train.after_backward   a training step after backward, before the optimizer step
    val.batch              a validation batch
    checkpoint.write       one write() call while a checkpoint file is being written
    checkpoint.rename      a checkpoint fully written to its temp file, not yet renamed
    checkpoint.link        a checkpoint in place, the `last` link to it not yet swapped in
    prep.document          a document added to a split being prepared
    prep.rename            a prepared split complete in its temp dir, not yet renamed
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("TINYRECIPE_KILL_AT")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)

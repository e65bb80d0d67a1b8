"""Failpoints for the fault-injection suite (`tests/faults/`).

`TINYRECIPE_KILL_AT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches
`failpoint("<point>")` — a real kill at an exact place, not a timing guess.
`TINYRECIPE_STOP_AT=<point>:<n>` SIGSTOPs it there instead: a hung rank, which a test then
kills from outside or leaves to the hang watchdog. A spec may end in `@<rank>` (that global rank
only) and `#<attempt>` (only in that torchrun restart, `TORCHELASTIC_RESTART_COUNT`), e.g.
`train.after_backward:5@1#0`; several specs are separated by commas. Unset (always, outside the
tests) a failpoint is two environment lookups. The points:

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
_ACTIONS = (("TINYRECIPE_KILL_AT", signal.SIGKILL), ("TINYRECIPE_STOP_AT", signal.SIGSTOP))


def _matches(spec: str, name: str) -> int | None:
    """The spec's count n when it names this point, rank and attempt, else None."""
    spec, _, attempt = spec.partition("#")
    spec, _, rank = spec.partition("@")
    point, _, n = spec.partition(":")
    if point != name:
        return None
    if rank and rank != os.environ.get("RANK", "0"):
        return None
    if attempt and attempt != os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"):
        return None
    return int(n or 1)


def failpoint(name: str) -> None:
    for variable, sig in _ACTIONS:
        for spec in filter(None, os.environ.get(variable, "").split(",")):
            if (n := _matches(spec, name)) is None:
                continue
            _counts[spec] = _counts.get(spec, 0) + 1
            if _counts[spec] == n:
                os.kill(os.getpid(), sig)

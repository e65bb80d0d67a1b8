"""The training-data position of a DataModule whose stream is a pure function of the global
sample index (the pretraining mixture, SFT rows): micro-batches consumed, this process's share,
the position saved and restored in samples, and Lightning's loop counters restated when a run
resumes on another number of processes or micro-batch size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, get_worker_info

from tinyrecipe._lightning import (
    batches_processed,
    restate_batch_progress,
    saved_batches_processed,
)


def micro_batch_samples(
    start_batch: int, batch_size: int, rank: int, world_size: int, stop_batch: int | None = None
) -> Iterator[int]:
    """The global sample indices this loader worker yields, in order: micro-batch b of a rank
    holds samples (b x world_size + rank) x batch_size ... + batch_size - 1, and worker w of W
    builds micro-batches start + w, start + w + W, ... (before `stop_batch`). PyTorch's
    DataLoader hands workers' batches out round-robin, so the order is the same for any W."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    b = start_batch + worker
    while stop_batch is None or b < stop_batch:
        first = (b * world_size + rank) * batch_size
        yield from range(first, first + batch_size)
        b += workers


class StreamPosition:
    """Mixed into a LightningDataModule with `batch_size` and `allow_global_batch_change`.
    Subclasses add their own keys to `state_dict` and check them in `resume_position` before
    `position_of`."""

    batches_consumed: int = 0
    allow_global_batch_change: bool = False

    def set_rank_world(
        self, rank: int, world_size: int, accumulate: int = 1, device: Any = None
    ) -> None:
        """Which share of the stream this process trains on, and on which device, without a
        Trainer (Fabric)."""
        self._rank_world_override = (rank, world_size, accumulate)
        self._device_override = device

    def pin_memory(self) -> bool:
        """Whether loaders pin their batches: when training on CUDA, so that the loops' copies
        to the GPU (non-blocking in Lightning and Fabric) overlap instead of waiting on a
        pageable copy."""
        device = getattr(self, "_device_override", None)
        trainer = getattr(self, "trainer", None)
        if device is None and trainer is not None:
            device = trainer.strategy.root_device
        return device is not None and torch.device(device).type == "cuda"

    def _rank_world(self) -> tuple[int, int]:
        if getattr(self, "_rank_world_override", None):
            return self._rank_world_override[:2]
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def accumulation(self) -> int:
        """Micro-batches per optimizer step: the Trainer's, or the Fabric loop's."""
        if getattr(self, "_rank_world_override", None):
            return self._rank_world_override[2]
        trainer = getattr(self, "trainer", None)
        return trainer.accumulate_grad_batches if trainer is not None else 1

    def global_batch(self) -> int:
        """Sequences per optimizer step: micro-batch x processes x accumulation."""
        return self.samples_per_batch() * self.accumulation()

    def _batches_done(self) -> int:
        """Micro-batches trained on. Under a fitting Trainer its progress counter is the truth:
        the loader itself runs a batch ahead (Lightning prefetches one to spot the last)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer, "training", False):
            return batches_processed(trainer)
        return self.batches_consumed

    def samples_per_batch(self) -> int:
        """Global samples one micro-batch of every process covers."""
        return self.batch_size * self._rank_world()[1]

    def position_state(self) -> dict[str, Any]:
        """The position keys of `state_dict`."""
        return {
            "samples_consumed": self._batches_done() * self.samples_per_batch(),
            "batches_consumed": self._batches_done(),
            "batch_size": self.batch_size,
            "world_size": self._rank_world()[1],
            "global_batch": self.global_batch(),
        }

    @staticmethod
    def samples_of(state: dict[str, Any]) -> int:
        """Global samples consumed at a checkpoint's position."""
        if state.get("samples_consumed") is None:  # written before elastic resume
            return state["batches_consumed"] * state["batch_size"] * state["world_size"]
        return state["samples_consumed"]

    def position_of(self, state: dict[str, Any]) -> int:
        """This run's micro-batches for a checkpoint's position (its other keys checked by the
        subclass); a changed global batch (unless allowed, and then only from a whole number of
        the new global batches) or a position between micro-batches is refused in one line."""
        samples = self.samples_of(state)
        global_batch, mine = state.get("global_batch"), self.global_batch()
        changed = global_batch is not None and global_batch != mine
        if changed and not self.allow_global_batch_change:
            raise ValueError(
                f"the checkpoint trained with a global batch of {global_batch} sequences, this "
                f"run has {mine}; keep it (batch_size x devices x accumulation) or set "
                "data.allow_global_batch_change: true"
            )
        per_batch = self.samples_per_batch()
        if samples % per_batch:
            raise ValueError(
                f"the checkpoint stopped after {samples} samples, not a multiple of this run's "
                f"{per_batch} per micro-batch (data.batch_size x processes); choose sizes that "
                "divide it"
            )
        if changed and samples % mine:
            raise ValueError(
                f"the checkpoint stopped after {samples} samples, not a whole number of this "
                f"run's global batches of {mine} (its steps would not start there); end the "
                f"earlier run at a step where steps x {global_batch} is a multiple of {mine}"
            )
        return samples // per_batch

    def resume_position(self, state: dict[str, Any]) -> int:
        return self.position_of(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_consumed = self.resume_position(state)

    def adapt_loop_progress(self, checkpoint: dict[str, Any]) -> None:
        """Rewrite the checkpoint's Lightning batch counters into this run's micro-batches (they
        count micro-batches of the run that wrote it), so accumulation boundaries and the data
        position agree after a resume with another world size or micro-batch size."""
        state = checkpoint.get(type(self).__qualname__)
        old = saved_batches_processed(checkpoint)
        if state is None or old is None:
            return
        new = self.resume_position(state)
        if old != new:
            restate_batch_progress(checkpoint, new)


class CountingLoader(DataLoader):
    """A DataLoader over a stream with a `start_batch` that starts it at its DataModule's
    position and tells the DataModule how many batches were handed out."""

    def __init__(self, datamodule: StreamPosition, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    # The position is the DataModule's state (saved with it); these two tell Lightning that the
    # loader resumes mid-epoch (else it warns that a finite one cannot).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __iter__(self):
        # the position when iteration starts (not at the first batch), before workers copy it
        self.dataset.start_batch = self._datamodule.batches_consumed
        return self._counted(super().__iter__())

    def _counted(self, batches):
        for batch in batches:
            self._datamodule.batches_consumed += 1
            yield batch

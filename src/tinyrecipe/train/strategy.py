"""`FSDP2Strategy` (recipe: `trainer.strategy: fsdp2`): Lightning's `ModelParallelStrategy` set up
for data-parallel FSDP2 training, with what a long multi-GPU run needs and Lightning lacks.

* **One gradient reduction per optimizer step.** Lightning blocks gradient sync during
  accumulation only for DDP; here the non-final micro-batches run with FSDP2's
  `set_requires_gradient_sync(False)`, so the fp32 gradients are reduce-scattered once per step,
  not once per micro-batch. The price: each rank keeps the unsharded fp32 gradients between
  micro-batches (4.4 GB at 1.1B parameters), counted by `tinyrecipe memory`.
* **Atomic sharded checkpoints.** Every rank writes its shards into `.<name>.tmp-sharded`; rank 0
  renames the directory into place once all ranks have finished. A killed save leaves the
  previous checkpoint as it was, and loading an unreadable checkpoint falls back to the newest
  readable one beside it (`tinyrecipe.checkpoint.load_with_fallback`), as for files.
* **Validation without `torch.inference_mode`**, in which FSDP2's unsharding has failed on some
  torch versions: the Trainer's evaluation loops run under `no_grad` instead.
* `reshard_after_forward` (default True, ZeRO-3): free each block's gathered weights after its
  forward; False (ZeRO-2) keeps them to backward: one all-gather per block and micro-batch less,
  the bf16 weights unsharded in memory (2.2 GB at 1.1B). `reshard_after_backward` (default True):
  False keeps them from one micro-batch to the next within an optimizer step
  (`tinyrecipe.model.parallelize.keep_gathered`); with both False the weights are gathered once
  per step instead of twice per micro-batch (32 times at TinyLlama's 16), for the memory of
  `reshard_after_forward` False alone. `recipes/tinyllama-1.1b.yaml` sets both.
* **Defaults that mean FSDP**: all devices of all nodes shard the model (`data_parallel_size`
  "auto" = world size, `tensor_parallel_size` 1). Lightning's own "auto" for both would make the
  devices of a node a tensor-parallel group.
* **HSDP** (`shard_group_size: 8`): shard within groups of that many ranks (a node) and
  replicate across the groups, on a 2-D device mesh (replicate, shard) given to `fully_shard`:
  the all-gathers stay inside a node, and across nodes only the gradients are all-reduced, once
  per step. TinyLlama v1.1 sharded its weights only within a 4-GPU node.

The decoder is sharded by `CausalLMModule.configure_model` (`tinyrecipe.model.parallelize`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from tinyrecipe._lightning import (
    SHARDED_METADATA_FILE,
    data_parallel_size,
    shard_over_every_rank,
    validate_without_inference_mode,
)
from tinyrecipe.checkpoint import load_with_fallback
from tinyrecipe.faults import failpoint
from tinyrecipe.io import publish, remove, remove_stale, temp_sibling
from tinyrecipe.model.parallelize import hsdp_mesh, keep_gathered

SHARDED_TAG = "sharded"  # the temporary directory name all ranks agree on


def _failpoint_writer(path: Path):
    """torch.distributed.checkpoint's file writer with a failpoint before each rank's writes (the
    fault suite kills a sharded save there)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            failpoint("checkpoint.write")
            return super().write_data(plan, planner)

    return Writer(path)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every device (see the module docstring). `trainer.strategy: fsdp2` in a recipe,
    `--trainer.strategy fsdp2` on the command line; options as
    `--trainer.strategy.reshard_after_forward false`."""

    strategy_name = "fsdp2"

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        reshard_after_forward: bool = True,
        reshard_after_backward: bool = True,
        shard_group_size: int | None = None,
    ) -> None:
        self.reshard_after_forward = reshard_after_forward
        self.reshard_after_backward = reshard_after_backward
        self.shard_group_size = shard_group_size
        self.sharded_checkpoints = save_distributed_checkpoint
        self.on_write = None  # (path, seconds) of each sharded checkpoint written: the journal
        self.on_fallback = None  # (path, used, why) of a damaged checkpoint passed over
        self._fsdp_mesh = None
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        shard_over_every_rank(self)
        super().setup_environment()
        if self.shard_group_size is not None and self.device_mesh["tensor_parallel"].size() != 1:
            raise ValueError("trainer.strategy.shard_group_size needs tensor_parallel_size 1")
        self._fsdp_mesh = hsdp_mesh(
            self.root_device.type, data_parallel_size(self), self.shard_group_size
        )

    @property
    def fsdp_mesh(self):
        """The mesh the decoder is sharded over: 1-D over every rank, or (replicate, shard)."""
        return self._fsdp_mesh if self._fsdp_mesh is not None else self.device_mesh["data_parallel"]

    def setup(self, trainer) -> None:
        validate_without_inference_mode(trainer)
        super().setup(trainer)

    # -- accumulation --------------------------------------------------------------------------

    def _fsdp_modules(self) -> list:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    @contextmanager
    def block_backward_sync(self):
        """Lightning enters this for every micro-batch but the last of an optimizer step."""
        modules = self._fsdp_modules()
        for m in modules:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            with keep_gathered(self.model, enabled=not self.reshard_after_backward):
                yield
        finally:
            for m in modules:
                m.set_requires_gradient_sync(True, recurse=False)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        if not self.sharded_checkpoints:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from torch.distributed.checkpoint import save

        start = time.perf_counter()
        path = Path(self.broadcast(str(filepath)))
        tmp = temp_sibling(path, SHARDED_TAG)
        if self.is_global_zero:
            remove_stale(path)
            tmp.mkdir(parents=True)
        self.barrier("tinyrecipe_ckpt_start")
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, optimizer_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optimizer_state
        try:
            save(state, storage_writer=_failpoint_writer(tmp))
            if self.is_global_zero:
                torch.save(checkpoint, tmp / SHARDED_METADATA_FILE)
            self.barrier("tinyrecipe_ckpt_written")
            if self.is_global_zero:
                failpoint("checkpoint.rename")
                publish(tmp, path)
        finally:
            if self.is_global_zero:
                remove(tmp)
        self.barrier("tinyrecipe_ckpt_done")
        if self.on_write is not None:
            self.on_write(path, time.perf_counter() - start)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_file():  # a consolidated single file (save_distributed_checkpoint=False)
            return super().load_checkpoint(path, weights_only)
        return load_with_fallback(
            path,
            lambda p: super(FSDP2Strategy, self).load_checkpoint(p, weights_only),
            any_failed=lambda failed: self.reduce_boolean_decision(failed, all=False),
            on_fallback=self.on_fallback,
        )

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            remove(filepath)


StrategyRegistry.register(
    FSDP2Strategy.strategy_name,
    FSDP2Strategy,
    description="FSDP2 over every device: no gradient sync during accumulation, atomic sharded checkpoints",
)

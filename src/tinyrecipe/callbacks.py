"""What Lightning's callbacks lack for us: MFU from our FLOPs formula and our peak table."""

from __future__ import annotations

from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor

from tinyrecipe.flops import device_peak_flops


def _inputs(batch):
    """The input ids of any batch the module trains on (its own rule, one place)."""
    from tinyrecipe.modules import CausalLMModule

    return CausalLMModule.inputs_and_targets(batch)[0]


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens, with MFU against our bf16 peak table
    (or `peak_flops` per device, e.g. a CPU's measured matmul peak). Logs
    throughput/{batches,samples,items,flops}_per_sec and throughput/mfu (items = tokens)."""

    def __init__(self, peak_flops: float | None = None, window_size: int = 100) -> None:
        super().__init__(
            batch_size_fn=lambda batch: _inputs(batch).size(0),
            length_fn=lambda batch: _inputs(batch).numel(),
            window_size=window_size,
        )
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops
        device = trainer.strategy.root_device
        if peak is None and device.type == "cuda":
            import torch

            try:
                peak = device_peak_flops(torch.cuda.get_device_name(device))
            except ValueError:
                peak = None  # unknown GPU: tokens/s still logged, MFU needs peak_flops
        self.available_flops = peak
        for key in list(self._throughputs):
            self._throughputs[key] = Throughput(
                available_flops=peak, world_size=trainer.world_size, **self.kwargs
            )

"""What Lightning's callbacks lack for us: MFU from our FLOPs formula and our peak table."""

from __future__ import annotations

from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

from tinyrecipe.flops import device_peak_flops, measure_matmul_peak


def _inputs(batch):
    """The input ids of any batch the module trains on (its own rule, one place)."""
    from tinyrecipe.modules import CausalLMModule

    return CausalLMModule.inputs_and_targets(batch)[0]


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens, with MFU against a peak per device:
    `peak_flops` when given; else a GPU's datasheet bf16 figure from our table; else (a CPU, which
    has none) the matmul FLOP/s measured at setup in the run's precision, with its threads.
    Logs train/device/{batches,samples,items,flops}_per_sec and train/device/mfu
    (items = tokens)."""

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
        elif peak is None and device.type == "cpu":
            from tinyrecipe.modules import compute_dtype

            dtype = compute_dtype(str(trainer.precision))
            peak = measure_matmul_peak(device, dtype)
            rank_zero_info(
                f"tinyrecipe: MFU is against this CPU's {str(dtype).removeprefix('torch.')} "
                f"matmul peak measured now: {peak / 1e9:,.1f} GFLOP/s (set peak_flops to fix it)"
            )
        self.available_flops = peak
        for key in list(self._throughputs):
            self._throughputs[key] = Throughput(
                available_flops=peak, world_size=trainer.world_size, **self.kwargs
            )

"""Training FLOPs per token and model-FLOPs utilisation: the one formula the logger, the
benchmarks and the planner all use.

FLOPs per trained token = 6·N + 12·L·d·T, where
  N = every parameter that takes part in a matmul: all parameters except the input embedding
      table (a lookup, not a matmul). The LM head is counted; with tied embeddings the shared
      matrix counts once. RMSNorm weights are counted too (0.01% of N; kept so N is exact).
  12·L·d·T = attention scores and weighted values (QK^T and AV, forward + backward), over the
      full T×T matrix as in PaLM's MFU definition (no discount for the causal mask).
For TinyLlama-1.1B at T=2048: 6 x 1,034,512,384 + 12 x 22 x 2048 x 2048 = 7.314e9 FLOPs/token,
so the paper's 24,000 tokens/s on an A100 (312 TFLOP/s bf16) is 56.3% MFU.
A LoRA run computes no weight gradient for the frozen matrices: 4·N + 6·N_lora + 12·L·d·T.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tinyrecipe.model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, without sparsity.
PEAK_FLOPS_BF16: dict[str, float] = {
    "A100": 312e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
}


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None, lora: int = 0) -> float:
    """Forward + backward FLOPs per token at context `seq_len` (default: the config's block_size).
    `lora`: the LoRA adapters' parameter count, when only they train."""
    T = config.block_size if seq_len is None else seq_len
    matrices = (4 if lora else 6) * config.num_params(embedding=False) + 6 * lora
    return matrices + 12 * config.n_layer * config.d_model * T


def forward_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward-only FLOPs per token (a third of the training FLOPs): inference and evaluation."""
    return train_flops_per_token(config, seq_len) / 3


def device_peak_flops(device_name: str) -> float:
    """Datasheet bf16 peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3'.

    Refuses to guess: an unknown device raises ValueError asking for the peak.
    """
    name = device_name.upper()
    if "H200" in name:
        return PEAK_FLOPS_BF16["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_FLOPS_BF16["H100 PCIe"]
        if "SXM" in name or "HBM3" in name:
            return PEAK_FLOPS_BF16["H100 SXM"]
    if "A100" in name:
        return PEAK_FLOPS_BF16["A100"]
    raise ValueError(
        f"no bf16 peak FLOP/s known for device {device_name!r}; pass peak_flops explicitly "
        f"(known: {', '.join(PEAK_FLOPS_BF16)})"
    )


def compute_dtype(precision: str):
    """The matmul dtype of a Lightning precision setting ("bf16-mixed" -> torch.bfloat16, ...)."""
    import torch

    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def measure_matmul_peak(
    device="cpu", dtype=None, sizes: tuple[int, ...] = (512, 1024), seconds: float = 0.1
) -> float:
    """FLOP/s of square matmuls measured now on `device` in `dtype` (default fp32) with the
    current thread count: the fastest single product over `sizes`, each size repeated for about
    `seconds`. The MFU peak for a device without a datasheet figure, such as a CPU. The fastest
    product, not the mean: on a shared machine other work only ever slows a product down (a mean
    read 107 GFLOP/s once at a run's start where ~190 is usual, and the run logged an MFU above
    100%); a reading can still come out low when the contention outlasts the measurement. The
    global RNG is left untouched, so measuring never changes a seeded run."""
    import time

    import torch

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = torch.Generator(device).manual_seed(0)  # never the global RNG: training must not change
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype or torch.float32, generator=rng)
        b = torch.randn(n, n, device=device, dtype=a.dtype, generator=rng)
        a @ b  # warm-up
        sync()
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < seconds:
            began = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - began))
            reps += 1
    return best


CPU_EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")


@functools.cache
def cpu_info() -> tuple[str, list[str]]:
    """This CPU's model name and the vector extensions of `CPU_EXTENSIONS` it has (from
    /proc/cpuinfo, read once; the processor's name and none elsewhere)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return name, [e for e in CPU_EXTENSIONS if e in flags]


def cpu_summary() -> str:
    """`model name: extensions`, as the run line and the benchmark header print it."""
    name, extensions = cpu_info()
    return f"{name}: {' '.join(extensions) or 'no AVX2/AVX-512/NEON found'}"


def device_peak(device, precision: str = "bf16-mixed", peak_flops: float | None = None):
    """(peak FLOP/s, where it comes from) for MFU on `device`: `peak_flops` when given; a GPU's
    datasheet bf16 figure from our table; a CPU's matmul rate measured now in the run's dtype with
    its threads; (None, why) for an unknown GPU."""
    import torch

    device = torch.device(device)
    if peak_flops:
        return peak_flops, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            return device_peak_flops(name), f"{name} datasheet bf16"
        except ValueError:
            return None, f"{name}: unknown peak (pass peak_flops)"
    dtype = compute_dtype(precision)
    return measure_matmul_peak(
        device, dtype
    ), f"measured {str(dtype).removeprefix('torch.')} matmul"


def mfu(
    tokens_per_sec: float,
    config: ModelConfig,
    *,
    seq_len: int | None = None,
    peak_flops: float | None = None,
    device_name: str | None = None,
    n_devices: int = 1,
) -> float:
    """Model-FLOPs utilisation in [0, 1]: achieved training FLOP/s over the devices' peak.

    `tokens_per_sec` is the total over `n_devices`. Give `peak_flops` (per device) or a
    `device_name` found in the peak table.
    """
    if peak_flops is None:
        if device_name is None:
            raise ValueError("mfu needs peak_flops or a device_name from the peak table")
        peak_flops = device_peak_flops(device_name)
    achieved = tokens_per_sec * train_flops_per_token(config, seq_len)
    return achieved / (peak_flops * n_devices)

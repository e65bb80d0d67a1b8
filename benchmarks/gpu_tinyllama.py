"""One-GPU check of the TinyLlama-1.1B training step: tokens/s, MFU and peak memory.

The paper's setting on one device: the 1.1B preset, context 2048, micro-batch 8, bf16-mixed,
AdamW, the chunked loss; SDPA and (when flash-attn is installed) FlashAttention-2, each eager
and with per-block torch.compile. One model in memory at a time. Targets (the paper reports
56% MFU on an A100): MFU >= 55% (6N + attention FLOPs, datasheet bf16 peak) and peak memory
<= 40 GB. About 3-5 minutes on one H100/H200.

    python benchmarks/gpu_tinyllama.py                       # one H100 / H200
    python benchmarks/gpu_tinyllama.py --json
    python benchmarks/gpu_tinyllama.py --cpu                 # the same script, tiny preset, CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_train import benchmark, parser  # noqa: E402

from tinyrecipe.model.attention import _flash_attn_func  # noqa: E402

MFU_TARGET, MEMORY_TARGET_GB = 0.55, 40.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny preset on CPU (tests this script)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cpu:
        base = ["--preset", "tiny", "--device", "cpu", "--seq", "256", "--batch", "8"]
        base += ["--precision", "32-true", "--warmup", "1", "--steps", "1", "--repeats", "1"]
    elif not torch.cuda.is_available():
        print("gpu_tinyllama: no CUDA device; run with --cpu for the CPU check", file=sys.stderr)
        return 2
    else:
        base = ["--preset", "tinyllama-1.1b", "--seq", "2048", "--batch", "8"]
        base += ["--precision", "bf16-mixed", "--warmup", "3", "--steps", "5", "--repeats", "3"]
    base += ["--chunk", "4096", "--sequential", "--runs", "ours-chunked", "ours-fast"]
    kernels = ["sdpa"] + (["flash"] if not args.cpu and _flash_attn_func() is not None else [])
    rows, result = {}, None
    for kernel in kernels:
        result = benchmark(parser().parse_args([*base, "--attention", kernel]))
        for name, row in result["runs"].items():
            label = f"{kernel} {'compiled' if name == 'ours-fast' else 'eager'}"
            rows[label] = row
    if "flash" not in kernels:
        rows["flash"] = None  # not installed (or CPU): say so rather than drop the row
    if args.json:
        json.dump({**result, "runs": rows}, sys.stdout, indent=2)
        print()
        return 0
    r = result
    print(
        f"{r['preset']}, batch {r['batch']} x {r['seq']}, {r['device']}, {r['precision']}, "
        f"chunked loss, fused AdamW; peak {r['peak_flops'] / 1e12:,.1f} TFLOP/s ({r['peak_source']})"
    )
    print(f"{'attention / compile':<22}{'tokens/s':>12}{'MFU':>8}{'peak GB':>10}{'est GB':>9}")
    for label, row in rows.items():
        if row is None:
            print(f"{label:<22}{'flash-attn not installed (pip install tinyrecipe[gpu])':>39}")
            continue
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib'] / 1024:.2f}"
        print(
            f"{label:<22}{row['tokens_per_s']:>12,.0f}{row['mfu']:>8.1%}"
            f"{peak:>10}{row['estimate_mib'] / 1024:>9.2f}"
        )
    if not args.cpu:
        best = max(row["mfu"] for row in rows.values() if row)
        lowest = min(row["peak_mib"] for row in rows.values() if row) / 1024
        print(
            f"targets: MFU >= {MFU_TARGET:.0%} -> best {best:.1%}; "
            f"peak memory <= {MEMORY_TARGET_GB:.0f} GB -> lowest {lowest:.1f} GB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

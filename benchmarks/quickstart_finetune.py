"""The fine-tuning figures of docs/quickstart.md and docs/interop.md, measured by running the
documented commands: after `make quickstart`,

    python data_prep/make_sft_sample.py --out data/sft/stdlib.jsonl
    tinyrecipe fit --config recipes/finetune/quickstart-sft.yaml                     # full
    tinyrecipe fit --config recipes/finetune/quickstart-sft.yaml --model.lora.rank 8 \\
        --model.optimizer.lr 3e-3 --model.schedule.min_lr 3e-4                    # LoRA

each run in its own directory under --out (the only argument added). Prints the validation
loss on the responses before and after each, with the wall time, and writes them as JSON
(`docs/assets/quickstart-finetune.json`, which a test holds the docs' figures to).

    python benchmarks/quickstart_finetune.py [--out out/finetune-figures] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = ["fit", "--config", "recipes/finetune/quickstart-sft.yaml"]
LORA = [
    *FULL,
    "--model.lora.rank",
    "8",
    "--model.optimizer.lr",
    "3e-3",
    "--model.schedule.min_lr",
    "3e-4",
]


def run(args: list[str], root: Path) -> dict:
    """One documented command into `root` (replaced): its validation losses and wall time."""
    from tinyrecipe.experiments.runs import read_run

    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, "-m", "tinyrecipe.cli", *args, "--trainer.default_root_dir", str(root)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    curve = read_run(root).curve("val/loss")
    return {
        "command": "tinyrecipe " + " ".join(args),
        "val_loss_before": round(curve[0][1], 3),
        "val_loss_after": round(curve[-1][1], 3),
        "steps": curve[-1][0],
        "seconds": round(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/finetune-figures", help="parent of the two runs")
    parser.add_argument("--json", default="docs/assets/quickstart-finetune.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not (ROOT / "out/quickstart/checkpoints/last.ckpt").exists():
        sys.exit("no quickstart checkpoint: run `make quickstart` first")
    sft = ROOT / "data/sft/stdlib.jsonl"
    if not sft.is_file():
        make = [sys.executable, "data_prep/make_sft_sample.py", "--out", str(sft)]
        subprocess.run(make, cwd=ROOT, check=True)
    out = ROOT / args.out
    figures = {"full": run(FULL, out / "full"), "lora": run(LORA, out / "lora")}
    import torch

    figures["machine"] = {"cpu": _cpu_name(), "threads": torch.get_num_threads()}
    print("| fine-tuning | val loss before | after | steps | seconds |\n|---|---|---|---|---|")
    for name in ("full", "lora"):
        f = figures[name]
        print(
            f"| {name} | {f['val_loss_before']:.3f} | {f['val_loss_after']:.3f} | {f['steps']} "
            f"| {f['seconds']} |"
        )
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {path}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()

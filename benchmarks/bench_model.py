"""Forward + backward tokens/s of tinyrecipe's decoder next to Hugging Face `LlamaForCausalLM`.

Same config, same weights, same batch, same threads, same process; the runs are interleaved
(ours, HF, ours, HF, ...) so machine noise hits both alike, and the median of the repeats is
reported with the ratio ours / HF.

    python benchmarks/bench_model.py                      # tiny preset, batch 8 x 256, 2 threads
    python benchmarks/bench_model.py --preset llama-20m --seq 512 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from tinyrecipe.model import Llama, ModelConfig  # noqa: E402
from tinyrecipe.model.hf import to_hf_config, to_hf_state_dict  # noqa: E402
from tinyrecipe.planning.flops import train_flops_per_token  # noqa: E402


def step_time(fn, idx: torch.Tensor, steps: int) -> float:
    """Seconds per forward+backward, averaged over `steps`."""
    start = time.perf_counter()
    for _ in range(steps):
        fn(idx).backward()
    if idx.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_name(args.preset, block_size=max(args.seq, 1))
    ours = Llama(config).to(args.device)

    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(config), attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=False)
    hf.to(args.device)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)

    runs = {
        "tinyrecipe": lambda x: ours(x, x).loss,
        # HF shifts labels inside; the extra position is noise at these sizes.
        "hf LlamaForCausalLM": lambda x: hf(input_ids=x, labels=x).loss,
    }
    for fn in runs.values():
        step_time(fn, idx, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(step_time(fn, idx, args.steps))

    tokens = args.batch * args.seq
    flops = train_flops_per_token(config, args.seq) * 2 / 3  # forward + backward, no optimizer
    result = {
        "preset": args.preset,
        "params": config.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "runs": {
            name: {
                "tokens_per_s": tokens / statistics.median(t),
                "gflops_per_s": tokens * flops / statistics.median(t) / 1e9,
            }
            for name, t in times.items()
        },
    }
    ref = result["runs"]["hf LlamaForCausalLM"]["tokens_per_s"]
    for run in result["runs"].values():
        run["ratio_vs_hf"] = run["tokens_per_s"] / ref
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.preset} ({config.num_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
        f"{args.threads} threads, {args.device}, torch {torch.__version__}, fwd+bwd"
    )
    print(f"{'model':<22}{'tokens/s':>12}{'GFLOP/s':>10}{'vs HF':>8}")
    for name, run in result["runs"].items():
        print(
            f"{name:<22}{run['tokens_per_s']:>12,.0f}{run['gflops_per_s']:>10.1f}"
            f"{run['ratio_vs_hf']:>8.2f}"
        )


if __name__ == "__main__":
    main()

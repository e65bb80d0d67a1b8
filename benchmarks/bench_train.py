"""Training-step throughput of tinyrecipe next to its peers, in one process.

Every run does the same work: forward + backward + AdamW step (the fused kernel for every peer)
on the same config, batch and threads. After a warm-up (compile included), the runs are
interleaved (ours, HF, litgpt, ours, ...) so machine noise hits all alike; the median of the
repeats is reported, with the page faults per step (a CPU's hidden cost of fresh large
tensors: the kernel maps and zero-fills each new page). MFU uses tinyrecipe's one FLOPs formula
(6N + attention) against this machine's matmul peak measured in the same run (CPU) or the
datasheet peak (GPU).

    python benchmarks/bench_train.py                        # tiny preset, 8 x 256, 2 threads
    python benchmarks/bench_train.py --runs ours ours-fast hf --json
    python benchmarks/bench_train.py --preset tinyllama-1.1b --seq 2048 --batch 8 \\
        --precision bf16-mixed --sequential                 # one GPU

Runs (each tinyrecipe switch is a recipe option; see README "Performance"):
    ours            the readable eager reference: plain loss, fused AdamW
    ours-foreach    ... with the foreach AdamW kernel instead of fused
    ours-chunked    ... with model.config.loss_chunk_size (no full fp32 logits)
    ours-compile    ... with model.speed.compile (torch.compile per block)
    ours-fast       chunked loss + per-block compile + fused AdamW
    ours-ckpt       ... with model.speed.activation_checkpointing (memory, not speed)
    ours-lora       ours-chunked fine-tuning rank-16 LoRA adapters only (model.lora.rank: 16)
    hf, hf-compile  transformers LlamaForCausalLM (SDPA), eager and torch.compile'd
    litgpt, litgpt-compile   litgpt's GPT from the same config (when litgpt is installed)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore", module="torch.distributed._tools")  # MemTracker chatter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tinyrecipe.model import Llama, ModelConfig  # noqa: E402
from tinyrecipe.model.lora import apply_lora, lora_params  # noqa: E402
from tinyrecipe.model.parallelize import apply_activation_checkpointing, compile_blocks  # noqa: E402
from tinyrecipe.planning.flops import (  # noqa: E402
    compute_dtype,
    cpu_summary,
    device_peak_flops,
    measure_matmul_peak,
    train_flops_per_token,
)
from tinyrecipe.planning.memory import MiB, estimate_memory  # noqa: E402
from tinyrecipe.train.optim import build_adamw  # noqa: E402

OURS = {  # name -> switches (chunked loss, compile, AdamW kernel, activation checkpointing)
    "ours": dict(chunked=False, compile=False, kernel="fused", ckpt=False),
    "ours-foreach": dict(chunked=False, compile=False, kernel="foreach", ckpt=False),
    "ours-chunked": dict(chunked=True, compile=False, kernel="fused", ckpt=False),
    "ours-compile": dict(chunked=False, compile=True, kernel="fused", ckpt=False),
    "ours-fast": dict(chunked=True, compile=True, kernel="fused", ckpt=False),
    "ours-ckpt": dict(chunked=False, compile=False, kernel="fused", ckpt=True),
    # packed blocks of 4 documents each, masked apart (data.document_mask): SDPA with a mask
    "ours-docmask": dict(chunked=True, compile=False, kernel="fused", ckpt=False, docmask=True),
    # the decoder frozen, adapters of rank 16 on every block's linear layers (model.lora.rank)
    "ours-lora": dict(chunked=True, compile=False, kernel="fused", ckpt=False, lora=16),
}
PEERS = ("hf", "hf-compile", "litgpt", "litgpt-compile")


@dataclasses.dataclass
class Run:
    name: str
    loss_fn: Callable[[torch.Tensor], torch.Tensor]  # batch (B, T+1) -> mean loss
    optimizer: torch.optim.Optimizer
    compiled: bool
    estimate_mib: float | None = None
    lora: int = 0  # LoRA adapter parameters (the rest frozen, without gradients)
    times: list[float] = dataclasses.field(default_factory=list)
    faults: list[float] = dataclasses.field(default_factory=list)  # page faults per step
    peak_mib: float | None = None


def _ours(name: str, cfg: ModelConfig, device: str) -> Run:
    s = OURS[name]
    with torch.device(device):
        model = Llama(cfg)
    if s.get("lora"):
        apply_lora(model, s["lora"], 2.0 * s["lora"])
    if s["ckpt"]:
        apply_activation_checkpointing(model)
    if s["compile"]:
        compile_blocks(model)
    if s.get("docmask"):

        def loss_fn(b: torch.Tensor) -> torch.Tensor:
            T = b.size(1) - 1  # four equal documents per row
            documents = (torch.arange(T, device=b.device) * 4 // T).expand(b.size(0), T)
            return model(b[:, :-1], b[:, 1:], documents=documents).loss

    else:

        def loss_fn(b: torch.Tensor) -> torch.Tensor:
            return model(b[:, :-1], b[:, 1:]).loss

    optimizer = build_adamw(model, 1e-4, kernel=s["kernel"])
    return Run(name, loss_fn, optimizer, s["compile"], lora=lora_params(cfg, s.get("lora")))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _hf(name: str, config: ModelConfig, device: str) -> Run:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyrecipe.model.hf import to_hf_config

    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(config), attn_implementation="sdpa")).to(
        device
    )
    fn = torch.compile(hf) if name.endswith("compile") else hf
    return Run(
        name,
        lambda b: _cross_entropy(fn(input_ids=b[:, :-1]).logits, b[:, 1:]),
        torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True),
        name.endswith("compile"),
    )


def _litgpt(name: str, config: ModelConfig, device: str) -> Run:
    from litgpt.config import Config
    from litgpt.model import GPT

    c = Config(
        n_layer=config.n_layer,
        n_embd=config.d_model,
        n_head=config.n_head,
        n_query_groups=config.n_kv_head,
        intermediate_size=config.d_ff,
        vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size,
        block_size=config.block_size,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        rotary_percentage=1.0,
        parallel_residual=False,
        norm_eps=config.norm_eps,
        rope_base=int(config.rope_theta),
    )
    with torch.device(device):
        model = GPT(c)
    fn = torch.compile(model) if name.endswith("compile") else model
    return Run(
        name,
        lambda b: _cross_entropy(fn(b[:, :-1]), b[:, 1:]),
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
        name.endswith("compile"),
    )


def available_runs() -> list[str]:
    runs = [*OURS, "hf", "hf-compile"]
    try:
        import litgpt.model  # noqa: F401
    except Exception:  # not installed (it is not a tinyrecipe dependency)
        return runs
    return [*runs, "litgpt", "litgpt-compile"]


def build_run(
    name: str, config: ModelConfig, device: str, precision: str, chunk_size: int, batch: int
) -> Run:
    torch.manual_seed(0)
    if name in OURS:
        s = OURS[name]
        cfg = dataclasses.replace(config, loss_chunk_size=chunk_size if s["chunked"] else 0)
        run = _ours(name, cfg, device)
        est = estimate_memory(
            cfg,
            batch,
            config.block_size,
            precision=precision,
            activation_checkpointing=s["ckpt"],
            compiled=s["compile"],
            lora=run.lora,
            cuda=device.startswith("cuda"),
        )
        run.estimate_mib = est.allocated / MiB  # what the peak measures (tensors)
        return run
    if name.startswith("hf"):
        return _hf(name, config, device)
    if name.startswith("litgpt"):
        return _litgpt(name, config, device)
    raise SystemExit(f"bench_train: unknown run {name!r}; known: {', '.join(available_runs())}")


def _autocast(device: str, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(run: Run, batch: torch.Tensor, device: str, precision: str) -> None:
    with _autocast(device, precision):
        loss = run.loss_fn(batch)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _minor_faults() -> int:
    """Page faults served without I/O so far in this process: on CPU, mostly fresh pages of
    large tensors that the allocator mapped (and the kernel zero-fills) anew."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(run: Run, batch: torch.Tensor, steps: int, device: str, precision: str) -> float:
    """Seconds per training step, averaged over `steps`; the page faults per step go to
    `run.faults`."""
    if batch.is_cuda:
        torch.cuda.synchronize()
    faults, start = _minor_faults(), time.perf_counter()
    for _ in range(steps):
        train_step(run, batch, device, precision)
    if batch.is_cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    run.faults.append((_minor_faults() - faults) / steps)
    return seconds


def peak_mib(run: Run, batch: torch.Tensor, device: str, precision: str) -> float | None:
    """Peak tensor memory of one step (model, grads, AdamW states, activations)."""
    if batch.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(run, batch, device, precision)
        return torch.cuda.max_memory_allocated() / MiB
    if run.compiled:  # CPU: tensors made inside a compiled graph are invisible to the tracker
        return None
    if run.lora:  # MemTracker hooks every parameter's gradient and refuses a frozen one
        return None
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(run.optimizer)
    with tracker:
        train_step(run, batch, device, precision)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / MiB


def cpu_matmul_peak(precision: str) -> float:
    """This machine's matmul FLOP/s now in the precision's compute dtype (a bf16 row is measured
    against the bf16 rate), with the threads set: best over square sizes."""
    dtype = compute_dtype(precision)
    return measure_matmul_peak("cpu", dtype, sizes=(512, 1024, 2048), seconds=0.13)


def benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = args.device
    config = ModelConfig.from_name(args.preset, block_size=args.seq)
    if args.attention:
        config = dataclasses.replace(config, attention=args.attention)
    on_cpu = not device.startswith("cuda")
    if on_cpu:  # measured between the repeats too; the best reading is the peak
        dtype = str(compute_dtype(args.precision)).removeprefix("torch.")
        peak, peak_source = cpu_matmul_peak(args.precision), f"measured {dtype} matmul, this run"
    else:
        name = torch.cuda.get_device_name(device)
        peak, peak_source = device_peak_flops(name), f"{name} datasheet bf16"
    names = args.runs or available_runs()
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    build = lambda n: build_run(n, config, device, args.precision, args.chunk, args.batch)  # noqa: E731
    runs: dict[str, Run] = {}
    if args.sequential:  # one model in memory at a time (a 1.1B model + AdamW on one GPU)
        for n in names:
            run = build(n)
            timed(run, batch, args.warmup, device, args.precision)
            for _ in range(args.repeats):
                run.times.append(timed(run, batch, args.steps, device, args.precision))
            run.peak_mib = peak_mib(run, batch, device, args.precision)
            run.loss_fn = run.optimizer = None  # free before the next run
            runs[n] = run
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    else:
        runs = {n: build(n) for n in names}
        for run in runs.values():
            timed(run, batch, args.warmup, device, args.precision)
        for _ in range(args.repeats):
            for run in runs.values():
                run.times.append(timed(run, batch, args.steps, device, args.precision))
            if on_cpu:
                peak = max(peak, cpu_matmul_peak(args.precision))
        for run in runs.values():
            run.peak_mib = peak_mib(run, batch, device, args.precision)

    tokens = args.batch * args.seq
    table = {}
    for n, run in runs.items():
        tps = tokens / statistics.median(run.times)
        flops = train_flops_per_token(config, args.seq, run.lora)
        table[n] = {
            "tokens_per_s": tps,
            "mfu": tps * flops / peak,
            "peak_mib": run.peak_mib,
            "estimate_mib": run.estimate_mib,
            "faults_per_step": statistics.median(run.faults[-args.repeats :]),
        }
    peers = [table[p]["tokens_per_s"] for p in PEERS if p in table]
    fastest_peer = max(peers) if peers else None
    for row in table.values():
        row["vs_fastest_peer"] = row["tokens_per_s"] / fastest_peer if fastest_peer else None
        row["vs_hf"] = row["tokens_per_s"] / table["hf"]["tokens_per_s"] if "hf" in table else None
    return {
        "preset": args.preset,
        "params": config.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "device": device,
        "precision": args.precision,
        "torch": torch.__version__,
        "cpu": cpu_summary() if on_cpu else None,
        "peak_flops": peak,
        "peak_source": peak_source,
        "flops_per_token": flops,
        "runs": table,
    }


def print_table(result: dict) -> None:
    r = result
    print(
        f"{r['preset']} ({r['params'] / 1e6:.1f}M params), batch {r['batch']} x {r['seq']}, "
        f"{r['threads']} threads, {r['device']}, {r['precision']}, torch {r['torch']}; "
        f"fwd+bwd+AdamW; peak {r['peak_flops'] / 1e9:,.0f} GFLOP/s ({r['peak_source']})"
    )
    if r.get("cpu"):
        print(f"cpu: {r['cpu']}")
    fmt = "{:<16}{:>11}{:>7}{:>10}{:>10}{:>10}{:>8}{:>10}"
    head = ("run", "tokens/s", "MFU", "peak MiB", "est MiB", "faults", "vs HF", "vs best")
    print(fmt.format(*head))
    for name, row in r["runs"].items():
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(
            fmt.format(
                name,
                num(row["tokens_per_s"], ",.0f"),
                num(row["mfu"], ".1%"),
                num(row["peak_mib"], ",.0f"),
                num(row["estimate_mib"], ",.0f"),
                num(row["faults_per_step"], ",.0f"),
                num(row["vs_hf"], ".2f"),
                num(row["vs_fastest_peer"], ".2f"),
            )
        )
    print("faults = page faults per timed step (fresh pages the kernel maps and zero-fills)")
    print("vs best = tokens/s over the fastest peer run (hf, hf-compile, litgpt*) in this table")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=512, help="loss_chunk_size of the chunked runs")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--attention", choices=["auto", "sdpa", "flash"], help="ours: kernel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", nargs="+", help=f"subset of: {' '.join([*OURS, *PEERS])}")
    p.add_argument("--sequential", action="store_true", help="one run in memory at a time")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = benchmark(args)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)


if __name__ == "__main__":
    main()

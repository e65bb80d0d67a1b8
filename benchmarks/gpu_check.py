"""`make gpu-check`: the TinyLlama-1.1B recipe's real path on every GPU of the machine, and the
GPU-only checks.

Sections (each reported even when another fails; results in <out>/gpu_check.json):

  recipe     `recipes/tinyllama-1.1b.yaml` through the same parser and Trainer as `tinyrecipe fit`
             on every GPU (torchrun, one process each, when there are several; FSDP2 with the
             weights kept gathered through the step, bf16-mixed, micro-batch 8 x 2048, the
             recipe's 16 micro-batches per step, clipping, logging, the chunked loss with its
             compiled kernel, meta init, compiled blocks) on synthetic data of the recipe's
             vocabulary: tokens/s per GPU and MFU per optimizer step, peak allocated and
             reserved memory against `tinyrecipe memory`'s estimate, one validation and one
             atomic sharded checkpoint of the first run; then the same step as 8 micro-batches
             of 16 (compiled-mb16), with activation checkpointing (compiled-ckpt) and with float8
             linear layers (compiled-float8, when torchao is installed). `--runs` picks others
             (eager, compiled-zero3).
  attention  `auto`'s choice, FlashAttention-3 and -2 (when installed), SDPA with cuDNN first and
             every SDPA backend against an fp64 reference, bf16, the 1.1B shape: error and
             forward+backward time.
  loss       the head's loss for one micro-batch (8 x 2048 tokens, vocab 32000, bf16): plain
             cross-entropy, the chunked loss eager, and with its compiled softmax kernel (the
             recipe's): forward + backward ms, peak memory, the loss against the plain one.
  precision  bf16-mixed against fp32: the loss over 50 steps of the llama-60m preset.
  generate   1.1B greedy decoding with the KV cache, bf16: tokens/s at batch 1 and 8, eager and
             compiled (static cache, CUDA graphs); one layer's attention for a new token over a
             static cache, query groups folded (the model's path on CUDA) against grouped.

    python benchmarks/gpu_check.py                     # every GPU here; one H100 / H200: ~8 min
    python benchmarks/gpu_check.py --peak-flops 989e12  # a GPU missing from the peak table
    python benchmarks/gpu_check.py --cpu --devices 2    # the same code paths, tiny, on CPU (tested)

Targets: MFU >= 58% for the compiled recipe (the paper: 56% on A100s), the memory estimate's
reserved figure within 10% of the measured reserved peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MFU_TARGET, MEMORY_TOLERANCE = 0.58, 0.10
GiB = 2**30


# ---- settings per mode -------------------------------------------------------------------------


def settings(cpu: bool) -> dict:
    if cpu:  # the same code paths at a size 2 CPU cores run in seconds
        return dict(
            preset="tiny",
            vocab=8192,
            seq=128,
            micro=2,
            accumulate=2,
            steps=3,
            warm=1,
            precision="32-true",
            accelerator="cpu",
            chunk=64,
            runs=("eager",),
            prec_preset="tiny",
            prec_steps=4,
            prec_batch=2,
            prec_seq=64,
            gen_new=8,
            gen_prompt=8,
            gen_compile=False,  # compiling on CPU takes longer than the rest of this check
            loss_compile=False,  # (tests/test_loss.py checks the compiled kernel on CPU)
        )
    return dict(
        preset="tinyllama-1.1b",
        vocab=32000,
        seq=2048,
        micro=8,
        accumulate=16,
        steps=5,  # 2 to warm up (compile), 2 timed, the last profiled with --profile
        warm=2,
        precision="bf16-mixed",
        accelerator="gpu",
        chunk=4096,
        runs=("compiled", "compiled-mb16", "compiled-ckpt", "compiled-float8"),
        prec_preset="llama-60m",
        prec_steps=50,
        prec_batch=8,
        prec_seq=1024,
        gen_new=256,
        gen_prompt=128,
        gen_compile=True,
        loss_compile=True,
    )


# ---- data --------------------------------------------------------------------------------------


def make_data(out: Path, vocab: int, tokens: int) -> list[dict]:
    """Two synthetic sources of the recipe's vocabulary (random Markov chains), prepared splits."""
    from tinyrecipe.data.prep import markov_documents, write_synthetic_split

    sources = []
    for i, (name, weight) in enumerate((("slimpajama", 0.7), ("starcoderdata", 0.3))):
        docs = markov_documents(tokens, vocab, seed=i)
        val = markov_documents(64 * 2049, vocab, seed=100 + i)
        sources.append(
            {
                "name": name,
                "train": str(write_synthetic_split(out / name / "train", docs, vocab)),
                "validation": str(write_synthetic_split(out / name / "validation", val, vocab)),
                "weight": weight,
            }
        )
    return sources


# ---- the recipe path -----------------------------------------------------------------------------


VARIANTS = {  # name -> (compile, micro-batch multiplier, extra recipe arguments)
    "compiled": (True, 1, []),
    "eager": (False, 1, []),
    # the recipe's weights resharded after every forward and backward (FSDP2's default, ZeRO-3):
    # 32 gathers (copies and casts at world size 1) a step instead of one
    "compiled-zero3": (
        True,
        1,
        [
            "--trainer.strategy.reshard_after_forward",
            "true",
            "--trainer.strategy.reshard_after_backward",
            "true",
        ],
    ),
    # the same 2M-token step in 8 micro-batches of 16: half the per-micro-batch work (FSDP2's
    # gathers and casts, the fp32 gradient accumulation, launch gaps) for twice the activations
    "compiled-mb16": (True, 2, []),
    # the blocks' linear layers in float8 (model.speed.float8; needs torchao on the machine; reported
    # as not run without it); MFU still against the bf16 peak
    "compiled-float8": (True, 1, ["--model.speed.float8", "true"]),
    # activation checkpointing under per-block compile (one graph per checkpointed block): what
    # `plan --emit` and a tight card turn on; its price in tokens/s and its memory
    "compiled-ckpt": (True, 1, ["--model.speed.activation_checkpointing", "true"]),
}


def step_shape(s: dict, variant: str) -> tuple[int, int, int]:
    """(optimizer steps, micro-batch, accumulation) of a variant: the same tokens a step."""
    factor = VARIANTS[variant][1]
    return s["steps"], s["micro"] * factor, s["accumulate"] // factor


def recipe_args(
    s: dict, variant: str, root: Path, sources: list[dict], devices: int = 1
) -> list[str]:
    """`tinyrecipe fit` arguments of one recipe run: the TinyLlama recipe at this mode's sizes on
    `devices` devices (each with the recipe's per-device micro-batch and accumulation), then the
    variant's own arguments (last: they win)."""
    compiled, _, extra = VARIANTS[variant]
    steps, micro, accumulate = step_shape(s, variant)
    args = [
        "--config",
        str(ROOT / "recipes/tinyllama-1.1b.yaml"),
        "--trainer.accelerator",
        s["accelerator"],
        "--trainer.devices",
        str(devices),
        "--trainer.precision",
        s["precision"],
        "--global_batch_size",
        str(micro * accumulate * devices),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps * accumulate),
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--checkpoint.every_n_train_steps",
        str(steps if compiled else 10**9),
        "--model.preset",
        s["preset"],
        "--model.speed.compile",
        str(compiled).lower(),
        "--model.config.loss_chunk_size",
        str(s["chunk"]),
        "--model.schedule.warmup_steps",
        "2",
        "--data.sources",
        json.dumps(sources),
        "--data.tokenizer_dir",
        "null",
        "--data.block_size",
        str(s["seq"]),
        "--data.batch_size",
        str(micro),
        "--data.num_workers",
        "2",
        "--data.val_max_blocks",
        "8",
        "--downstream_eval.tasks",  # the recipe's commonsense tasks need their datasets
        "null",
    ]
    if s["accelerator"] == "cpu":
        args += [
            "--model.config.vocab_size",
            str(s["vocab"]),
            "--model.config.block_size",
            str(s["seq"]),
        ]
    return args + extra


def run_recipe(
    out: Path,
    s: dict,
    variant: str,
    peak_flops: float | None,
    profile: bool = False,
    devices: int = 1,
) -> dict:
    """One `tinyrecipe fit` of the TinyLlama recipe on `devices` devices (this process is one
    rank: torchrun starts the others)."""
    compiled = VARIANTS[variant][0]
    from lightning.pytorch.callbacks import Callback

    from tinyrecipe.cli.fit import TinyRecipeCLI
    from tinyrecipe.planning.flops import device_peak, train_flops_per_token
    from tinyrecipe.planning.memory import estimate_memory
    from tinyrecipe.train.build import describe
    from tinyrecipe.train.callbacks import Checkpoints, DeviceEvent

    listed = json.loads((out / "data.json").read_text())["sources"]  # prepare_run's
    sources = json.loads(Path(listed).read_text())
    root = out / variant
    steps, micro, accumulate = step_shape(s, variant)
    args = recipe_args(s, variant, root, sources, devices)
    times: list[float] = []
    profiled: dict = {}

    class StepTimer(Callback):
        """Optimizer-step times, each taken when the device has done the step (an event waited
        for at the end of the next step: no idle device at step boundaries, as in the recipe's
        throughput monitor); with `profile`, the last step under torch.profiler (untimed)."""

        def __init__(self) -> None:
            self.last, self.queued, self.profiler = None, None, None

        def _time_queued(self) -> None:
            if self.queued is not None:
                done = self.queued.wait()
                if self.last is not None:
                    times.append(done - self.last)
                self.last, self.queued = done, None

        def on_train_batch_end(self, trainer, *_):
            if trainer.fit_loop._should_accumulate():
                return
            event = DeviceEvent(trainer.strategy.root_device)
            self._time_queued()
            self.queued = event
            if self.profiler is not None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the step's last kernels inside the profile
                self.profiler.stop()
                table = self.profiler.key_averages().table(
                    sort_by="self_device_time_total"
                    if torch.cuda.is_available()
                    else "self_cpu_time_total",
                    row_limit=40,
                )
                (out / f"recipe-{variant}-profile.txt").write_text(table)
                profiled.update(summarize_profile(self.profiler.events()))
                self.profiler = None
            if profile and trainer.global_step == steps - 1:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                self._time_queued()  # the profiled step is not timed
                self.last = None
                activities = [ProfilerActivity.CPU]
                activities += [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                self.profiler = torch_profile(activities=activities, with_flops=True)
                self.profiler.start()

        def on_train_end(self, *_):
            self._time_queued()

    cli = TinyRecipeCLI(
        run=False,
        args=args,
        save_config_callback=None,
    )
    trainer, module = cli.trainer, cli.model
    trainer.callbacks.insert(0, StepTimer())
    if variant != "compiled" and s["accelerator"] == "gpu":  # one 13 GB checkpoint is enough
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, Checkpoints)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, cli.datamodule)
    wall = time.perf_counter() - start
    cfg = module.config
    tokens_per_step = micro * s["seq"] * accumulate  # per device
    timed = times[s["warm"] - 1 :] if len(times) >= s["warm"] else times  # compile left out
    step_s = statistics.median(timed)
    tps = tokens_per_step / step_s  # per device
    peak, source = device_peak(trainer.strategy.root_device, s["precision"], peak_flops)
    est = estimate_memory(
        cfg,
        micro,
        s["seq"],
        precision=s["precision"],
        world_size=devices,
        sharded=True,  # FSDP2, at world size 1 too: its gathered compute-dtype weights count
        accumulation=accumulate,
        compiled=compiled,
        gathered=not (
            trainer.strategy.reshard_after_forward and trainer.strategy.reshard_after_backward
        ),
    )
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ckpt = root / "checkpoints" / "last.ckpt"
    row = {
        "describe": describe(module.settings, s["precision"], trainer.strategy.root_device),
        "devices": devices,
        "rank": trainer.global_rank,
        "steps_timed": len(timed),
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": tps,
        "mfu": tps * train_flops_per_token(cfg, s["seq"]) / peak if peak else None,
        "peak_source": source,
        "wall_s": wall,
        "estimate_gib": est.allocated / GiB,  # tensors: against the allocated peak
        "estimate_reserved_gib": est.reserved / GiB,  # against the reserved peak (the target)
        "estimate_total_gib": est.total / GiB,  # with the CUDA context: what must fit the card
        "loss": logged.get("train/loss"),
        "grad_norm": logged.get("train/grad_norm"),
        "val_loss": logged.get("val/loss"),
        "checkpoint": str(ckpt.resolve()) if ckpt.exists() else None,
        "checkpoint_complete": (ckpt / ".metadata").is_file() if ckpt.is_dir() else ckpt.is_file(),
    }
    if profiled:
        row["profile"] = profiled
    if torch.cuda.is_available():
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        row["estimate_error"] = row["estimate_reserved_gib"] / row["peak_reserved_gib"] - 1
    return row


# ---- where a step's time goes ---------------------------------------------------------------------

CATEGORIES = (  # (category, pattern over a kernel's or, on CPU, an operator's lower-cased name)
    ("attention", r"flash|fmha|cudnn|attention|sdpa|sdp_"),
    (
        "matmul",
        r"gemm|xmma|cutlass|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm|linear|matmul)\b|mkldnn",
    ),
    ("communication", r"nccl|all_?gather|reduce_?scatter|all_?reduce|c10d"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("copies and casts", r"copy|cast|memcpy|memset|cat\b|cat_|split_with_sizes|fill|to_copy|index"),
    ("fused (inductor)", r"^triton_|cpp_fused|compiled"),
    (
        "elementwise and reductions",
        r"elementwise|reduce_kernel|aten::(mul|add|sub|div|silu|exp|rsqrt|pow|mean|sum|neg|where"
        r"|masked_fill|softmax|log|amax|sigmoid|square|clamp|gather|scatter|embedding|ne|eq)",
    ),
)


def categorize(name: str) -> str:
    import re

    lowered = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def summarize_profile(events) -> dict:
    """One profiled step by category: milliseconds of device kernels (GPU) or of operators'
    own time (CPU), the step's span, the time the device was busy (overlapping streams counted
    once) and idle, and the rate of the matrix products from the profiler's FLOP counts."""
    from torch.autograd import DeviceType

    device = [e for e in events if e.device_type != DeviceType.CPU]
    timed = device or [e for e in events if e.device_type == DeviceType.CPU]
    if not timed:
        return {}
    own = (lambda e: e.time_range.elapsed_us()) if device else (lambda e: e.self_cpu_time_total)
    by: dict[str, float] = {}
    for e in timed:
        by[categorize(e.name)] = by.get(categorize(e.name), 0.0) + own(e) / 1e3
    spans = sorted((e.time_range.start, e.time_range.end) for e in timed)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of the intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    span = max(b for _, b in spans) - spans[0][0]
    matmul_flops = sum(
        e.flops or 0
        for e in events
        if e.device_type == DeviceType.CPU and categorize(e.name) == "matmul"
    )
    matmul_ms = by.get("matmul", 0.0)
    return {
        "ms_by_category": dict(sorted(by.items(), key=lambda kv: -kv[1])),
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "idle_fraction": max(0.0, 1 - busy / span) if span > 0 else None,
        "matmul_tflops": matmul_flops / matmul_ms / 1e9 if matmul_ms else None,
    }


# ---- kernels and numerics ------------------------------------------------------------------------


def _timed(fn, reps: int = 10) -> float:
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def check_attention(s: dict) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinyrecipe.model.attention import (
        causal_attention,
        load_fa3,
        load_flash_attn,
        select_backend,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, T, H, KV, D = (4, s["seq"], 32, 4, 64) if device == "cuda" else (2, 64, 8, 2, 32)
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device=device, generator=g) for h in (H, KV, KV))
    ref = causal_attention(q.double(), k.double(), v.double(), "sdpa")
    rows = {}

    def measure(name, fn):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        try:
            out = fn(qq, kk, vv)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            seconds = _timed(lambda: fn(qq, kk, vv).sum().backward())
            rows[name] = {"rel_error": err, "fwd_bwd_ms": seconds * 1e3}
        except Exception as exc:  # a backend that cannot run this shape or dtype
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}

    chosen = select_backend(q.to(dtype), "auto")
    measure(f"auto (chooses {chosen})", lambda a, b, c: causal_attention(a, b, c, "auto"))
    if device == "cuda" and load_flash_attn() is not None:
        measure("flash-attn", lambda a, b, c: causal_attention(a, b, c, "flash"))
    else:
        rows["flash-attn"] = {"error": "flash-attn not installed (pip install 'tinyrecipe[gpu]')"}
    if device == "cuda" and load_fa3() is not None:
        measure("flash-attn 3", lambda a, b, c: causal_attention(a, b, c, "fa3"))
    else:
        rows["flash-attn 3"] = {"error": "flash_attn_interface (FlashAttention-3) not installed"}
    if device == "cuda":
        measure("cudnn (cuDNN first)", lambda a, b, c: causal_attention(a, b, c, "cudnn"))
    backends = {
        "sdpa (auto)": None,
        "sdpa flash": SDPBackend.FLASH_ATTENTION,
        "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa math": SDPBackend.MATH,
    }
    for name, backend in backends.items():
        if backend is None:
            measure(name, lambda a, b, c: causal_attention(a, b, c, "sdpa"))
        else:

            def run(a, b, c, backend=backend):
                with sdpa_kernel(backend):
                    return causal_attention(a, b, c, "sdpa")

            measure(name, run)
    # data.document_mask: four documents a row, each attending only to itself
    from tinyrecipe.model.attention import (
        DocumentMask,
        _document_attention,
        load_torch_varlen,
        masked_sdpa,
    )

    documents = (torch.arange(T, device=device) * 4 // T).expand(B, T)
    pieces = [slice(i * T // 4, (i + 1) * T // 4) for i in range(4)]
    ref = torch.cat(
        [causal_attention(*(t[:, p].double() for t in (q, k, v)), "sdpa") for p in pieces], 1
    )
    dense = DocumentMask.from_documents(documents)
    sequences = DocumentMask.from_documents(documents, varlen=True)
    kernels = {  # name: (available, the kernel's call)
        "document mask, flash-attn varlen": (
            device == "cuda" and load_flash_attn() is not None,
            lambda a, b, c: _document_attention(a, b, c, "flash", sequences),
        ),
        "document mask, torch varlen": (
            device == "cuda" and load_torch_varlen() is not None,
            lambda a, b, c: _document_attention(a, b, c, "varlen", sequences),
        ),
        # SDPA's dense mask, KV heads repeated on CUDA (the fallback), and grouped as before
        "document mask, sdpa": (True, lambda a, b, c: _document_attention(a, b, c, "sdpa", dense)),
        "document mask, sdpa grouped kv": (
            True,
            lambda a, b, c: masked_sdpa(
                *(t.transpose(1, 2) for t in (a, b, c)), dense.dense, ungroup=False
            ).transpose(1, 2),
        ),
    }
    for name, (available, fn) in kernels.items():
        if available:
            measure(name, fn)
        else:
            rows[name] = {"error": "not available here (flash-attn, or torch's varlen: CUDA)"}
    return rows


def check_loss(s: dict) -> dict:
    """The head's loss on one micro-batch: plain, chunked eager, chunked with compiled kernels."""
    import torch.nn.functional as F

    from tinyrecipe.model.loss import linear_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d = 2048 if device == "cuda" else 64
    tokens = s["micro"] * s["seq"]
    g = torch.Generator(device).manual_seed(0)
    h = torch.randn(tokens, d, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(s["vocab"], d, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, s["vocab"], (tokens,), device=device, generator=g)
    runs = {
        "plain": lambda: F.cross_entropy((h @ w.T).float(), targets),
        "chunked": lambda: linear_cross_entropy(h, w, targets, s["chunk"]),
    }
    if s["loss_compile"]:
        runs["chunked, compiled kernel"] = lambda: linear_cross_entropy(
            h, w, targets, s["chunk"], compiled=True
        )
    rows, ref = {}, None
    for name, fn in runs.items():
        loss = fn()  # the first call compiles
        loss.backward()
        ref = loss.item() if ref is None else ref
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        seconds = _timed(lambda fn=fn: fn().backward())
        peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else None
        rows[name] = {
            "fwd_bwd_ms": seconds * 1e3,
            "peak_mib": None if peak is None else peak / 2**20,
            "loss_rel_diff": abs(loss.item() - ref) / ref,
        }
        h.grad = w.grad = None
    return rows


def check_precision(s: dict) -> dict:
    """The shared step (tinyrecipe.train.step) in fp32 and bf16 autocast from the same init."""
    from tinyrecipe.data.prep import markov_documents
    from tinyrecipe.model import Llama
    from tinyrecipe.model.config import resolve_config
    from tinyrecipe.train.optim import build_adamw
    from tinyrecipe.train.step import finish_step, micro_batch_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = resolve_config(
        s["prec_preset"], {"block_size": s["prec_seq"], "vocab_size": min(s["vocab"], 8192)}
    )
    docs = markov_documents(
        s["prec_steps"] * s["prec_batch"] * (s["prec_seq"] + 1),
        config.vocab_size,
        s["prec_seq"] + 1,
    )
    data = torch.from_numpy(__import__("numpy").stack(docs).astype("int64")).to(device)
    curves = {}
    for name, dtype in (("fp32", None), ("bf16-mixed", torch.bfloat16)):
        torch.manual_seed(0)
        with torch.device(device):
            model = Llama(config)
        opt = build_adamw(model, 1e-3)
        params = list(model.parameters())
        losses = []
        for step in range(s["prec_steps"]):
            rows = data[step * s["prec_batch"] : (step + 1) * s["prec_batch"]]
            batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = micro_batch_loss(model, batch)
            loss.backward()
            finish_step(params, loss.detach(), 1, max_norm=1.0, optimizer=opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = losses
    diff = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16-mixed"], strict=True)]
    return {
        "preset": s["prec_preset"],
        "steps": s["prec_steps"],
        "fp32_first_last": [curves["fp32"][0], curves["fp32"][-1]],
        "bf16_first_last": [curves["bf16-mixed"][0], curves["bf16-mixed"][-1]],
        "max_abs_diff": max(diff),
        "final_rel_diff": diff[-1] / curves["fp32"][-1],
    }


def check_generate(s: dict) -> dict:
    from tinyrecipe.generation import generate
    from tinyrecipe.model import Llama
    from tinyrecipe.model.config import resolve_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = resolve_config(s["preset"], {"vocab_size": s["vocab"]} if device == "cpu" else None)
    with torch.device(device):
        model = Llama(config).to(dtype).eval()
    rows = {}
    # one layer's attention for one new token over a static cache (the compiled decoder's):
    # the cache's mask with each KV head's query group folded into the query length (what runs
    # on CUDA) against SDPA's grouped call (its math kernel on CUDA copies the cache per head)
    from tinyrecipe.model.attention import masked_sdpa

    B, S, H, KV, D = 8, config.block_size, config.n_head, config.n_kv_head, config.head_dim
    q = torch.randn(B, H, 1, D, device=device)
    k, v = (torch.randn(B, KV, S, D, device=device) for _ in range(2))
    mask = torch.arange(S, device=device)[None, :] <= S // 2  # half the cache filled
    ref = masked_sdpa(q.double(), k.double(), v.double(), mask, ungroup=False)
    qq, kk, vv = (t.to(dtype) for t in (q, k, v))
    for name, ungroup in (("folded", True), ("grouped", False)):
        with torch.no_grad():
            err = (masked_sdpa(qq, kk, vv, mask, ungroup).double() - ref).norm() / ref.norm()
            ms = _timed(lambda u=ungroup: masked_sdpa(qq, kk, vv, mask, u), reps=20) * 1e3
        rows[f"decode attention {name}"] = {"ms": ms, "rel_error": err.item()}
    for compiled in (False, True) if s["gen_compile"] else (False,):
        for batch in (1, 8):
            idx = torch.randint(0, config.vocab_size, (batch, s["gen_prompt"]), device=device)
            name = f"batch {batch}" + (" compiled" if compiled else "")
            started = time.perf_counter()
            generate(model, idx, 4, temperature=0, compile=compiled)  # warm-up (compiles)
            warm = time.perf_counter() - started
            seconds = _timed(
                lambda idx=idx, c=compiled: generate(
                    model, idx, s["gen_new"], temperature=0, compile=c
                ),
                reps=2,
            )
            rows[name] = {"new_tokens_per_s": batch * s["gen_new"] / seconds, "warm_up_s": warm}
    return rows


# ---- driver ------------------------------------------------------------------------------------


def _save(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))


def table(report: dict) -> str:
    env = report.get("env", {})
    lines = [
        f"gpu-check: {env.get('device')}, torch {env.get('torch')}, lightning {env.get('lightning')}, "
        f"peak {env.get('peak_flops') or 0:.3g} FLOP/s ({env.get('peak_source')})",
        "",
        "| recipe run | tokens/s per device | MFU | step s | peak alloc GiB | est. alloc | reserved GiB | est. reserved | est. error | loss | val loss | ckpt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for name in [k for k in report if k.startswith("recipe ")]:
        r = report[name]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:150]} |")
            continue
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {f(r['mfu'], '.1%')} | {r['step_s']:.3f} | "
            f"{f(r.get('peak_allocated_gib'), '.1f')} | {r['estimate_gib']:.1f} | "
            f"{f(r.get('peak_reserved_gib'), '.1f')} | {r['estimate_reserved_gib']:.1f} | "
            f"{f(r.get('estimate_error'), '+.0%')} | {f(r['loss'], '.3f')} | "
            f"{f(r['val_loss'], '.3f')} | {'yes' if r['checkpoint_complete'] else '-'} |"
        )
    for name in [k for k in report if k.startswith("recipe ")]:
        prof = report[name].get("profile")
        if prof:
            parts = ", ".join(f"{k} {v:,.0f} ms" for k, v in prof["ms_by_category"].items())
            rate = prof.get("matmul_tflops")
            lines.append(
                f"\nprofile of one step ({name}): {parts}; matmuls at "
                f"{f(rate, ',.1f')} TFLOP/s; device busy {prof['busy_ms']:,.0f} of "
                f"{prof['span_ms']:,.0f} ms (idle {f(prof['idle_fraction'], '.1%')})"
            )
    att = report.get("attention", {})
    if att and "error" not in att:
        lines += [
            "",
            "| attention (bf16, 1.1B shape) | rel. error vs fp64 | fwd+bwd ms |",
            "|---|---|---|",
        ]
        for name, r in att.items():
            if "error" in r:
                lines.append(f"| {name} | {r['error'][:80]} | |")
            else:
                lines.append(f"| {name} | {r['rel_error']:.2e} | {r['fwd_bwd_ms']:.2f} |")
    p = report.get("precision", {})
    if p and "error" not in p:
        lines += [
            "",
            f"precision ({p['preset']}, {p['steps']} steps): fp32 loss {p['fp32_first_last'][0]:.3f} -> "
            f"{p['fp32_first_last'][1]:.3f}, bf16-mixed {p['bf16_first_last'][0]:.3f} -> "
            f"{p['bf16_first_last'][1]:.3f}; max |diff| {p['max_abs_diff']:.4f}, final {p['final_rel_diff']:.2%}",
        ]
    lo = report.get("loss", {})
    if lo and "error" not in lo:
        lines += ["", "| head loss, one micro-batch | fwd+bwd ms | peak MiB | loss vs plain |"]
        lines.append("|---|---|---|---|")
        for name, r in lo.items():
            lines.append(
                f"| {name} | {r['fwd_bwd_ms']:.1f} | {f(r['peak_mib'], ',.0f')} | "
                f"{r['loss_rel_diff']:.1e} |"
            )
    g = report.get("generate", {})
    if g and "error" not in g:
        speeds = {k: v for k, v in g.items() if "new_tokens_per_s" in v}
        decode = {k: v for k, v in g.items() if "ms" in v}
        lines += [
            "",
            "generate (greedy, KV cache): "
            + ", ".join(
                f"{k}: {v['new_tokens_per_s']:,.0f} new tokens/s" for k, v in speeds.items()
            ),
            "one layer's attention for a new token, batch 8, static cache: "
            + ", ".join(
                f"{k.removeprefix('decode attention ')} {v['ms']:.3f} ms (rel. error "
                f"{v['rel_error']:.1e})"
                for k, v in decode.items()
            ),
        ]
    for name in ("attention", "loss", "precision", "generate"):
        if "error" in report.get(name, {}):
            lines.append(f"{name} failed: {report[name]['error'][:300]}")
    c = report.get("recipe compiled", {})
    if c.get("mfu") is not None:
        lines.append(
            f"\ntargets: MFU >= {MFU_TARGET:.0%} -> {c['mfu']:.1%}; estimate within "
            f"{MEMORY_TOLERANCE:.0%} of the reserved peak -> {f(c.get('estimate_error'), '+.1%')}"
        )
        m = report.get("recipe compiled-mb16", {})
        if m.get("mfu") is not None:
            lines.append(
                f"micro-batch 16: MFU {m['mfu']:.1%} ({m['mfu'] / c['mfu'] - 1:+.1%} against 8), "
                f"peak {f(m.get('peak_allocated_gib'), '.1f')} GiB at world size {m['devices']}"
            )
    return "\n".join(lines)


def prepare_run(out: Path, s: dict, variant: str, devices: int) -> None:
    """Before a recipe run's processes start (one place, not once per rank): its synthetic data
    (made once per --out) and an empty run directory (a rerun into the same --out starts
    afresh)."""
    tokens = (s["steps"] + 1) * s["accumulate"] * s["micro"] * devices * 2049
    data = out / f"data-{s['vocab']}-{tokens}"  # a --cpu run's data is not a GPU run's
    if not (data / "sources.json").is_file():
        data.mkdir(parents=True, exist_ok=True)
        (data / "sources.json").write_text(json.dumps(make_data(data, s["vocab"], tokens)))
    (out / "data.json").write_text(json.dumps({"sources": str(data / "sources.json")}))
    shutil.rmtree(out / variant, ignore_errors=True)


def recipe_command(variant: str, out: Path, devices: int) -> list[str]:
    """The child process of one recipe run: this script alone on one device, under torchrun
    (one process per device, a standalone rendezvous) on several."""
    child = [__file__, "--out", str(out), "--_recipe", variant, "--devices", str(devices)]
    if devices == 1:
        return [sys.executable, *child]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc-per-node", str(devices), *child]


def _imports(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (tests this script)")
    p.add_argument("--peak-flops", type=float, help="bf16 peak FLOP/s of a GPU not in the table")
    p.add_argument("--out", default=os.environ.get("OUT", "out/gpu-check"))
    p.add_argument(
        "--only", help="comma-separated sections: recipe,attention,loss,precision,generate"
    )
    p.add_argument("--runs", help=f"recipe variants to run, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true", help="profile one step of the first run")
    p.add_argument(
        "--devices",
        type=int,
        help="devices for the recipe runs (default: every GPU; torchrun starts one process each)",
    )
    p.add_argument("--_recipe", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for the CPU check", file=sys.stderr)
        return 2
    s = settings(args.cpu)
    devices = args.devices or (1 if args.cpu else torch.cuda.device_count())
    if args._recipe:  # a child process (one rank of it): one recipe run, its own memory stats
        row = run_recipe(out, s, args._recipe, args.peak_flops, args.profile, devices)
        if row["rank"] == 0:
            (out / f"recipe-{args._recipe}.json").write_text(json.dumps(row, indent=2))
        return 0

    import lightning

    from tinyrecipe.planning.flops import device_peak

    device = torch.device("cuda" if not args.cpu else "cpu")
    peak, source = device_peak(device, s["precision"], args.peak_flops)
    report: dict = {
        "env": {
            "device": torch.cuda.get_device_name() if not args.cpu else "cpu",
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "peak_flops": peak,
            "peak_source": source,
        }
    }
    only = set((args.only or "recipe,attention,loss,precision,generate").split(","))
    if "recipe" in only:
        runs = args.runs.split(",") if args.runs else list(s["runs"])
        report["env"]["devices"] = devices
        for i, name in enumerate(runs):
            if VARIANTS[name][2][:2] == ["--model.speed.float8", "true"] and not _imports(
                "torchao"
            ):
                report[f"recipe {name}"] = {"error": "not run: torchao is not installed"}
                continue
            prepare_run(out, s, name, devices)
            cmd = recipe_command(name, out, devices)
            cmd += ["--cpu"] if args.cpu else []
            cmd += ["--profile"] if args.profile and i == 0 else []
            cmd += ["--peak-flops", str(args.peak_flops)] if args.peak_flops else []
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            (out / f"recipe-{name}.log").write_text(proc.stdout + proc.stderr)
            result = out / f"recipe-{name}.json"
            if proc.returncode == 0 and result.is_file():
                report[f"recipe {name}"] = json.loads(result.read_text())
            else:
                report[f"recipe {name}"] = {"error": (proc.stderr or proc.stdout)[-1500:]}
            report[f"recipe {name}"]["process_s"] = time.perf_counter() - started
            print(f"recipe {name}: {time.perf_counter() - started:.0f} s", flush=True)
            _save(out, report)
    for name, fn in (
        ("attention", check_attention),
        ("loss", check_loss),
        ("precision", check_precision),
        ("generate", check_generate),
    ):
        if name not in only:
            continue
        started = time.perf_counter()
        try:
            report[name] = fn(s)
        except Exception:
            report[name] = {"error": traceback.format_exc()[-1500:]}
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        _save(out, report)
    text = table(report)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Scoring speed of `tinyrecipe eval` against lm-eval's own HFLM on the exported model, same task,
same requests, same batch size, in one process (runs interleaved, median of the repeats).

    python benchmarks/bench_eval.py                    # tiny preset, the offline stdlib_mc task
    python benchmarks/bench_eval.py --batch-size 16 --items 400 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from tinyrecipe.checkpoint import save_tinyrecipe_checkpoint  # noqa: E402
from tinyrecipe.data.sample import make_eval_sample, make_sample  # noqa: E402
from tinyrecipe.data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from tinyrecipe.evaluation import TinyRecipeLM, task_manager  # noqa: E402
from tinyrecipe.interop.convert import to_hf  # noqa: E402
from tinyrecipe.model import Llama  # noqa: E402
from tinyrecipe.model.config import resolve_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--items", type=int, default=200, help="questions (4 requests each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_sample(tmp / "raw", max_mb=2)
        from tinyrecipe.data.prep import iter_texts

        texts = iter_texts(sorted((tmp / "raw").rglob("*.*")))
        train_bpe_tokenizer(texts, 1024, tmp / "tok")
        make_eval_sample(tmp / "raw", tmp / "task", n_items=args.items)
        config = resolve_config(args.preset, {"vocab_size": 1024})
        torch.manual_seed(0)
        model = Llama(config).eval()
        save_tinyrecipe_checkpoint(config, model.state_dict(), tmp / "model.ckpt")
        to_hf(tmp / "model.ckpt", tmp / "hf", tokenizer_dir=tmp / "tok")
        manager = task_manager(tmp / "task", ["stdlib_mc"])
        task = manager.load_task_or_group(["stdlib_mc"])["stdlib_mc"]
        task.build_all_requests()
        requests = task.instances
        lms = {
            "tinyrecipe eval": TinyRecipeLM(model, load_tokenizer(tmp / "tok"), args.batch_size),
            "lm-eval HFLM (exported)": HFLM(
                pretrained=str(tmp / "hf"),
                batch_size=args.batch_size,
                device="cpu",
                dtype="float32",
            ),
        }
        for lm in lms.values():  # warm-up
            lm.loglikelihood(requests[: 4 * args.batch_size])
        times = {name: [] for name in lms}
        for _ in range(args.repeats):
            for name, lm in lms.items():
                start = time.perf_counter()
                lm.loglikelihood(requests)
                times[name].append(time.perf_counter() - start)
    rows = {name: len(requests) / statistics.median(t) for name, t in times.items()}
    ours, hf = rows["tinyrecipe eval"], rows["lm-eval HFLM (exported)"]
    report = {
        "preset": args.preset,
        "params": config.num_params(),
        "requests": len(requests),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "requests_per_s": rows,
        "ours_vs_hflm": ours / hf,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.preset} ({config.num_params() / 1e6:.1f}M params), stdlib_mc: {len(requests)} "
        f"log-likelihood requests, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}"
    )
    for name, value in rows.items():
        print(f"  {name:<26}{value:>10,.1f} requests/s")
    print(f"  tinyrecipe / HFLM: {ours / hf:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

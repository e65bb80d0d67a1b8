"""Downstream evaluation on EleutherAI's lm-evaluation-harness, driving tinyrecipe's own model.

`TinyRecipeLM` is an `lm_eval` `TemplateLM`: the harness's own request handling (the
context/continuation split, empty contexts, rolling windows) with our decoder underneath, so any
checkpoint tinyrecipe reads is evaluated without an export step. `evaluate(...)` runs tasks and
returns `{task: {metric: value}}` with lm-eval's metric names; `tinyrecipe eval` is its command
line and `tinyrecipe.train.callbacks.DownstreamEval` runs it inside training.

BOS: like lm-eval's `HFLM` on a Llama tokenizer (whose encoding starts with `<s>`), every
context is encoded with BOS first (`add_bos_token=True`, the default); an empty context is BOS
alone. `add_bos_token=False` matches `HFLM(add_bos_token=False)`.

Under several processes (`distributed=True`, in training) each rank scores its share of the
requests; all ranks run the same number of forward passes, so a sharded (FSDP2) model works.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from tinyrecipe.data.tokenizer import TextTokenizer
from tinyrecipe.generation import generate
from tinyrecipe.model import Llama
from tinyrecipe.watchdog import beat

TASKS_DIR = Path(__file__).with_name("tasks")  # tinyllama-commonsense and friends
COMMONSENSE = "tinyllama-commonsense"
# The TinyLlama repository's EVAL.md (lm-evaluation-harness, zero-shot, %): acc_norm where the
# task reports it, acc for WinoGrande and BoolQ.
PUBLISHED = {
    "TinyLlama-1.1B 3T": {
        "hellaswag": 59.20,
        "openbookqa": 36.00,
        "winogrande": 59.12,
        "arc_challenge": 30.12,
        "arc_easy": 55.25,
        "boolq": 57.83,
        "piqa": 73.29,
    },
    "Pythia-1.0B": {
        "hellaswag": 47.16,
        "openbookqa": 31.40,
        "winogrande": 53.43,
        "arc_challenge": 27.05,
        "arc_easy": 48.99,
        "boolq": 60.83,
        "piqa": 69.21,
    },
}


class TinyRecipeLM(TemplateLM):
    """lm-eval's model interface over a `Llama` and its tokenizer."""

    def __init__(
        self,
        model: Llama,
        tokenizer: TextTokenizer,
        batch_size: int = 8,
        add_bos_token: bool = True,
        autocast: Any = None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the model's vocabulary has {model.config.vocab_size} tokens but the tokenizer "
                f"'{tokenizer.path.parent}' has {tokenizer.vocab_size}; evaluate with the "
                "tokenizer the model was trained with"
            )
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.add_bos_token = add_bos_token
        self.autocast = autocast or nullcontext
        self.max_length = model.config.block_size
        if distributed and dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return ([self.tok.bos_id] if bos else []) + self.tok.encode(string)

    # -- distributed (lm-eval pads the requests so that every rank gets as many) ---------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.ndim == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def _max_over_ranks(self, mine: int) -> int:
        """The largest of the ranks' counts: forward passes, or tokens to decode, that every rank
        makes (a sharded model needs them in step)."""
        if self.world_size == 1:
            return mine
        n = torch.tensor(mine, device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n.item())

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of log p(continuation | context), whether it is the greedy continuation) per
        request, in the harness's order. Longest first, batched, right-padded (causal: padding
        after a row changes nothing before it), truncated from the left to the context length."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        passes = self._max_over_ranks(len(batches))
        was_training = self.model.training
        self.model.eval()
        for b in range(passes):
            beat()  # progress, for the hang watchdog of a run scoring inside fit
            batch = batches[b] if b < len(batches) else batches[-1][:1] if batches else []
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            rows = rows or [[self.tok.bos_id]]  # a rank with nothing left still steps with the rest
            width = max(map(len, rows))
            idx = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            for r, row in enumerate(rows):
                idx[r, : len(row)] = torch.tensor(row, device=self.device)
            with self.autocast():
                logits = self.model(idx).logits
            if b >= len(batches):
                continue
            for r, i in enumerate(batch):
                cont = requests[i][2]
                end = len(rows[r])
                # the softmax over the continuation's positions only (HFLM takes all of them)
                cont_logprobs = F.log_softmax(logits[r, end - len(cont) : end].float(), dim=-1)
                target = torch.tensor(cont, device=self.device)
                greedy = bool((cont_logprobs.argmax(-1) == target).all())
                results[i] = (float(cont_logprobs.gather(-1, target[:, None]).sum()), greedy)
        self.model.train(was_training)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of the context length: the
        harness's own windowing over the document's encoding, as HFLM does it (with BOS on, the
        encoding starts with BOS and the first window's prefix is BOS too)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = make_disjoint_window(window)
                windows.append(((None, None), context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations with the KV cache, cut at the first stop string. Under several
        processes every rank decodes the largest `max_gen_toks` of the pass's requests and keeps
        its own; a long context is cut to leave room for that many (sharded models step
        together)."""
        out = []
        passes = self._max_over_ranks(len(requests))
        for n in range(passes):
            beat()
            context, kwargs = requests[min(n, len(requests) - 1)].args if requests else ("", {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            own = int(kwargs.get("max_gen_toks", 256))
            new = self._max_over_ranks(own)  # the ranks' requests may differ (two tasks)
            ids = self.tok_encode(context)[-max(1, self.max_length - new) :] or [self.tok.bos_id]
            idx = torch.tensor([ids], device=self.device)
            with self.autocast():
                tokens = generate(
                    self.model,
                    idx,
                    new,
                    temperature=0,
                    eos_id=self.tok.eos_id if self.world_size == 1 else None,
                )[0, len(ids) : len(ids) + own].tolist()
            if n >= len(requests):
                continue
            if self.tok.eos_id in tokens:  # several processes generate on past it
                tokens = tokens[: tokens.index(self.tok.eos_id)]
            text = self.tok.decode(tokens)
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


def task_manager(include_path: str | Path | list | None = None, names: list[str] | None = None):
    """lm-eval's TaskManager with tinyrecipe's tasks (`tinyllama-commonsense`) and the user's.
    Indexing lm-eval's ~15,000 task YAMLs takes ~12 s, so with `names` whose every task is
    defined under tinyrecipe's and the user's directories (the quickstart's `stdlib_mc`), the
    manager indexes those directories alone (milliseconds); otherwise lm-eval's tasks are indexed
    too. A manager is reused while the files under its directories are unchanged (none added,
    removed or modified, at any depth)."""
    paths = [str(TASKS_DIR)]
    if include_path:
        for path in include_path if isinstance(include_path, list) else [include_path]:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"--include-path '{path}' is not a directory of task YAMLs")
            paths.append(str(path))
    key = (tuple(paths), tuple(_tree_stamp(p) for p in paths))
    if names:
        own = _task_manager(*key, defaults=False)
        if all(_defined_in(own, name) for name in names):
            return own
    return _task_manager(*key, defaults=True)


def task_names(tasks: str | list[str]) -> list[str]:
    """`"a, b"` or `["a", "b"]` -> `["a", "b"]` (blanks dropped)."""
    return [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]


def _defined_in(manager, name: str, depth: int = 0) -> bool:
    """Whether `name` and all it stands for (a group's tasks, recursively) are in `manager`."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 16:
        return False
    if entry.kind.name == "GROUP":
        tasks = entry.cfg.get("task") or []
        tasks = tasks if isinstance(tasks, list) else [tasks]
        return all(isinstance(t, str) and _defined_in(manager, t, depth + 1) for t in tasks)
    return entry.kind.name in ("TASK", "PY_TASK")  # a tag's members: the full index decides


def _tree_stamp(root: str) -> tuple[int, int]:
    """(number of entries, newest modification time) under `root`: changes when a file or folder
    is added, removed or edited anywhere below it."""
    count, newest = 0, os.stat(root).st_mtime_ns
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            count += 1
            newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
    return count, newest


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], _stamps: tuple[tuple[int, int], ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def load_tasks(names: list[str], manager) -> dict:
    """lm-eval's task objects for task and group names (`{task: Task}`, groups expanded), loaded
    one name at a time so that a failure names its task: an unknown name (with the closest known
    ones), or data that cannot be had offline."""
    known = set(manager.all_tasks)
    tasks: dict = {}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task '{name}'{hint} (--include-path adds task YAMLs)")
        try:
            tasks.update(manager.load([name])["tasks"])
        except Exception as err:  # datasets raise many kinds when the data is not there
            raise ValueError(
                f"task '{name}' cannot load its data ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160] if str(err) else ''}); with no network, put the "
                "dataset in the Hugging Face datasets cache (HF_DATASETS_CACHE) or give a task YAML "
                "reading local files (dataset_path: json, data_files) with --include-path"
            ) from None
    return tasks


def evaluate(
    lm: TinyRecipeLM,
    tasks: list[str] | str,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | Path | list | None = None,
    samples: bool = False,
) -> dict | None:
    """Run lm-eval tasks on `lm`: `{"results": {task: {metric: value}}, "config": {...}}` on rank
    0 (None on the others); metric names are lm-eval's (`acc`, `acc_norm`, `acc_stderr`, ...;
    a filter other than `none` after a slash: `exact_match/strict-match`), values fractions.
    With `samples`, also lm-eval's per-request records."""
    from lm_eval.evaluator import simple_evaluate

    if limit is not None and limit <= 0:
        raise ValueError(f"--limit {limit} must be a positive number of examples per task")
    names = task_names(tasks)
    if not names:
        raise ValueError("no tasks given; name lm-eval tasks or groups, e.g. --tasks arc_easy")
    manager = task_manager(include_path, names)
    load_tasks(names, manager)  # a failure names its task
    raw = simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=samples,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    if raw is None:  # not rank 0
        return None
    results = {task: row for task, metrics in raw["results"].items() if (row := _row(metrics))}
    out = {
        "results": results,
        "config": {
            "tasks": names,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": lm.batch_size,
            "add_bos_token": lm.add_bos_token,
            "lm_eval": __import__("lm_eval").__version__,
        },
    }
    if samples:
        out["samples"] = raw.get("samples", {})
    return out


MEAN_OF_ZERO_ONE = ("acc", "acc_norm", "exact_match")  # metrics that average 0/1 scores


def _row(metrics: dict) -> dict[str, float]:
    """One task's numeric scores from lm-eval's `metric,filter` keys: `acc` for the `none` filter,
    `exact_match/strict-match` for another (two filters never share a name), with the stderr of
    each mean of 0/1 scores."""
    row = {}
    for key, value in metrics.items():
        metric, _, kept = key.partition(",")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and metric != "sample_len" and not math.isnan(value):
            row[metric if kept in ("", "none") else f"{metric}/{kept}"] = value
    n = metrics.get("sample_len")
    for name, value in list(row.items()):
        if name.split("/")[0] in MEAN_OF_ZERO_ONE and isinstance(n, int) and n > 1:
            # lm-eval's mean_stderr, exact for a mean of 0/1 scores (its bootstrap is off)
            row[f"{name}_stderr"] = math.sqrt(value * (1 - value) / (n - 1))
    return row


def headline(metrics: dict) -> tuple[str, float] | None:
    """The metric a table shows for a task: acc_norm where reported, else acc, else the first."""
    for name in ("acc_norm", "acc", "exact_match", "f1"):
        if name in metrics:
            return name, metrics[name]
    numeric = [(k, v) for k, v in metrics.items() if not k.endswith("stderr")]
    return numeric[0] if numeric else None


def table(results: dict, label: str = "this model") -> str:
    """A markdown table of the scores (%); the paper's rows beside them for its seven tasks."""
    rows = {t: headline(m) for t, m in results.items() if headline(m)}
    paper = list(PUBLISHED["TinyLlama-1.1B 3T"])
    if set(paper) <= set(rows):
        head = "| model | " + " | ".join(paper) + " | avg |"
        lines = [head, "|---" * (len(paper) + 2) + "|"]
        ours = [100 * rows[t][1] for t in paper]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.2f}" for v in ours)
            + f" | {sum(ours) / len(ours):.2f} |"
        )
        for name, scores in PUBLISHED.items():
            vals = [scores[t] for t in paper]
            lines.append(
                f"| {name} (published) | "
                + " | ".join(f"{v:.2f}" for v in vals)
                + f" | {sum(vals) / len(vals):.2f} |"
            )
        return "\n".join(lines)
    lines = ["| task | metric | value | ± stderr |", "|---|---|---|---|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            err = metrics.get(f"{metric}_stderr")
            shown = f"{100 * err:.2f}" if err is not None else ""
            lines.append(f"| {task} | {metric} | {100 * value:.2f} | {shown} |")
    return "\n".join(lines)


def flat_metrics(scores: dict) -> dict[str, float]:
    """`eval/<task>/<metric>` → value, for loggers (stderr and counts left out)."""
    return {
        f"eval/{task}/{metric}": float(value)
        for task, metrics in scores["results"].items()
        for metric, value in metrics.items()
        if not metric.endswith("stderr") and metric != "sample_len"
    }


def downstream_metrics(
    model: Llama,
    tokenizer_dir: str | Path,
    tasks: str | list[str],
    *,
    limit: int | None = None,
    include_path: str | Path | list | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    add_bos_token: bool = True,
    autocast: Any = None,
    distributed: bool = False,
) -> dict[str, float] | None:
    """`eval/<task>/<metric>` of `model` now (rank 0; None elsewhere): what the Trainer's
    `DownstreamEval` and the Fabric loop log during training."""
    from tinyrecipe.data.tokenizer import load_tokenizer

    if tokenizer_dir is None:
        raise ValueError(
            "downstream_eval needs a tokenizer: set downstream_eval.tokenizer_dir or "
            "data.tokenizer_dir"
        )
    lm = TinyRecipeLM(
        model,
        load_tokenizer(tokenizer_dir),
        batch_size,
        add_bos_token=add_bos_token,
        autocast=autocast,
        distributed=distributed,
    )
    scores = evaluate(lm, tasks, num_fewshot=num_fewshot, limit=limit, include_path=include_path)
    return None if scores is None else flat_metrics(scores)

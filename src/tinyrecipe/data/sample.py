"""The offline sample corpus: the running Python's standard library, written in the two real
input formats (SlimPajama `*.jsonl.zst`, Starcoderdata `*.parquet`) so the real prep runs on it.

Prose: `pydoc_data` documentation topics and the docstrings of every stdlib module (read with
`ast`, nothing is imported). Code: the stdlib `.py` sources. Deterministic: sorted inputs, and
the split is a hash of each document, so the same Python gives the same bytes.
"""

from __future__ import annotations

import ast
import io
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tinyrecipe.data.prep import in_validation
from tinyrecipe.io import atomic_write

# Record labels as SlimPajama's `meta.redpajama_set_name` uses them. The GitHub records are
# there on purpose: TinyLlama drops SlimPajama's GitHub subset (Starcoderdata replaces it).
PROSE_SET, DOCSTRING_SET, GITHUB_SET = "RedPajamaWikipedia", "RedPajamaBook", "RedPajamaGithub"
VALIDATION_PERMILLE = 50  # 5% of documents go to the validation split


def stdlib_sources() -> list[Path]:
    """The stdlib's `.py` files, sorted, without tests and third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def docstrings(path: Path) -> str | None:
    """Module, class and function docstrings of one source file joined as one document."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
    ]
    parts = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc) > 40:
            title = getattr(node, "name", path.stem)
            parts.append(f"{title}\n\n{doc}")
    return "\n\n".join(parts) or None


def prose_records(sources: list[Path]) -> Iterator[dict]:
    """SlimPajama-style records: doc topics, module docstrings, and a few GitHub records."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield {"text": topics[key], "meta": {"redpajama_set_name": PROSE_SET}}
    for i, path in enumerate(sources):
        text = docstrings(path)
        if text:
            yield {"text": text, "meta": {"redpajama_set_name": DOCSTRING_SET}}
        if i % 25 == 0:  # every 25th source file also appears as a GitHub record (to be dropped)
            yield {
                "text": path.read_text(encoding="utf-8", errors="replace"),
                "meta": {"redpajama_set_name": GITHUB_SET},
            }


def _write_jsonl_zst(path: Path, records: list[dict]) -> None:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    atomic_write(path, zstandard.ZstdCompressor(level=3).compress(raw))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("id", pa.string()), ("max_stars_repo_path", pa.string()), ("content", pa.string())]
        ),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(path, buf.getvalue())


def _take(items: Iterator, max_bytes: float, size) -> list:
    out, total = [], 0
    for item in items:
        if total >= max_bytes:
            break
        out.append(item)
        total += size(item)
    return out


def _shard(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)] if len(items) >= n else [items]


def make_sample(out: str | Path, max_mb: float | None = None, files_per_split: int = 2) -> dict:
    """Write the sample corpus under `out`; returns {source: {documents, mb}} and prints it.

    `max_mb` caps each source's uncompressed text (for fast tests); None takes everything.
    """
    out = Path(out)
    limit = float("inf") if max_mb is None else max_mb * 1e6
    sources = stdlib_sources()
    summary = {}

    prose = _take(prose_records(sources), limit, lambda r: len(r["text"]))
    splits = {"train": [], "validation": []}
    for record in prose:
        splits[
            "validation" if in_validation(record["text"], VALIDATION_PERMILLE) else "train"
        ].append(record)
    names = {"train": "example_train_{}.jsonl.zst", "validation": "example_holdout_{}.jsonl.zst"}
    for split, records in splits.items():
        for i, shard in enumerate(_shard(records, files_per_split)):
            _write_jsonl_zst(out / "slimpajama" / split / "chunk1" / names[split].format(i), shard)
    summary["slimpajama"] = {
        "documents": len(prose),
        "github_documents": sum(r["meta"]["redpajama_set_name"] == GITHUB_SET for r in prose),
        "mb": sum(len(r["text"].encode()) for r in prose) / 1e6,
    }

    root = Path(sysconfig.get_paths()["stdlib"])
    rows = (
        {
            "id": str(i),
            "max_stars_repo_path": str(p.relative_to(root)),
            "content": p.read_text(encoding="utf-8", errors="replace"),
        }
        for i, p in enumerate(sources)
    )
    code = _take(rows, limit, lambda r: len(r["content"]))
    shards = _shard(code, files_per_split)
    for i, shard in enumerate(shards):
        _write_parquet(
            out / "starcoderdata" / "python" / f"train-{i:05d}-of-{len(shards):05d}.parquet", shard
        )
    summary["starcoderdata"] = {
        "documents": len(code),
        "mb": sum(len(r["content"].encode()) for r in code) / 1e6,
    }

    for name, s in summary.items():
        print(f"{name}: {s['documents']} documents, {s['mb']:.2f} MB -> {out / name}")
    return summary


def sft_records(max_records: int | None = None) -> Iterator[dict]:
    """Instruction records from the stdlib (offline): "What does `mod.func` do?" answered by
    the first paragraph of its docstring, in both record forms (prompt/response and messages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for path in stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            first = doc.split("\n\n")[0].replace("\n", " ").strip() if doc else ""
            if not 20 <= len(first) <= 300:
                continue
            prompt = f"What does `{module}.{node.name}` do?"
            if n % 2:
                yield {"prompt": prompt, "response": first}
            else:
                yield {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": first},
                    ]
                }
            n += 1
            if max_records is not None and n >= max_records:
                return


def make_sft_sample(out: str | Path, max_records: int | None = None) -> int:
    """Write `sft_records` as JSON lines to `out` (temp file, then rename); returns the count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = list(sft_records(max_records))
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"sft: {len(records)} records -> {out}")
    return len(records)


EVAL_TASK = "stdlib_mc"


def _eval_items(texts: list[str], kind: str) -> list[tuple[str, str]]:
    """(context, true continuation) pairs: a prose sentence or a line of code cut at a space
    near its middle, with the sentence or up to three lines before it as context."""
    import re

    items = []
    for text in texts:
        if kind == "prose":
            units = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
            joiner, keep = " ", 1
        else:
            units = [line.rstrip() for line in text.splitlines() if line.strip()]
            joiner, keep = "\n", 3
        for i, unit in enumerate(units):
            body = unit.lstrip()
            if len(body.split()) < 6 or len(body) > 200 or body.startswith("#"):
                continue
            cut = unit.find(" ", len(unit) - len(body) + len(body) // 2)
            if cut <= 0:
                continue
            before = joiner.join(units[max(0, i - keep) : i])
            context = (before + joiner if before else "") + unit[:cut]
            items.append((context, unit[cut:]))
    return items


def make_eval_sample(
    raw: str | Path,
    out: str | Path,
    n_items: int = 400,
    seed: int = 0,
    val_permille: int = VALIDATION_PERMILLE,
) -> Path:
    """A multiple-choice task from the held-out half of the sample corpus: pick the true rest of a
    docstring sentence or of a line of code among four (the other three are the rests of other
    sentences or lines of the same kind). Writes `<out>/stdlib_mc.jsonl` and the lm-eval task
    `<out>/stdlib_mc.yaml` (`tinyrecipe eval --include-path <out> --tasks stdlib_mc`); chance
    is 25%. `val_permille` is the code held out by `prepare_starcoder.py --val-permille`.
    Returns the YAML's path."""
    import random

    from tinyrecipe.data.readers import SLIMPAJAMA, STARCODER, read_records

    raw, out = Path(raw), Path(out)
    prose_files = sorted((raw / "slimpajama" / "validation").rglob("*.jsonl*"))
    code_files = sorted((raw / "starcoderdata").rglob("*.parquet"))
    if not prose_files or not code_files:
        raise FileNotFoundError(
            f"'{raw}' holds no sample corpus (slimpajama/validation, starcoderdata); "
            "build it with data_prep/make_sample.py"
        )
    prose = [t for f in prose_files for t, r in read_records(f, SLIMPAJAMA) if r is None]
    code = [
        t
        for f in code_files
        for t, r in read_records(f, STARCODER)
        if r is None and in_validation(t, val_permille)  # the documents prep holds out
    ]
    rng = random.Random(seed)
    docs = []
    for kind, texts in (("prose", prose), ("code", code)):
        pairs = _eval_items(texts, kind)
        rng.shuffle(pairs)
        chosen, others = pairs[: n_items // 2], pairs[n_items // 2 :] or pairs
        for context, truth in chosen:
            pool = [c for _, c in others if c != truth]
            choices = [truth, *rng.sample(pool, 3)]
            rng.shuffle(choices)
            docs.append({"context": context, "choices": choices, "label": choices.index(truth)})
    data = out / f"{EVAL_TASK}.jsonl"
    atomic_write(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    task = out / f"{EVAL_TASK}.yaml"
    atomic_write(
        task,
        "\n".join(
            [
                f"task: {EVAL_TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data.resolve()))}",
                "test_split: test",
                "output_type: multiple_choice",
                "doc_to_text: context",
                "doc_to_choice: choices",
                "doc_to_target: label",
                'target_delimiter: ""',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "  - metric: acc_norm",
                "    aggregation: mean",
                "    higher_is_better: true",
                "",
            ]
        ),
    )
    print(
        f"{EVAL_TASK}: {len(docs)} questions ({len(prose)} prose, {len(code)} code documents) -> {task}"
    )
    return task

"""Corpus preparation: raw text in any common format -> litdata token chunks + metadata.

One prepared split is a litdata directory (`index.json` + `chunk-*.bin`) of token ids, one item
per document (uint16 when the vocab fits), readable by `StreamingDataset(item_loader=
TokensLoader(block_size))`. Our metadata sits in the same `index.json` under "tinyrecipe", so a
remote copy carries it too.

Documents are tokenized in parallel (a process pool over input files, in order) and written by
one writer in file order, so the output is byte-identical whatever the worker count. A split is
built in a temporary directory and renamed into place only when complete; a rerun with the same
inputs (`input_id`), tokenizer and options skips it.

Across machines, `shard=(i, n)` prepares the i-th of n contiguous runs of the input files (split
by bytes) into `out/parts/<i>-of-<n>/`; `merge_parts` rewrites the parts' documents in order
through the same writer, so the merged split is byte-identical to a one-shot preparation.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyrecipe.data.readers import (
    LINE_SUFFIXES,
    SLIMPAJAMA,
    STARCODER,
    RecordFormat,
    expand_inputs,
    read_records,
    record_fields,
)
from tinyrecipe.data.tokenizer import TextTokenizer
from tinyrecipe.faults import failpoint
from tinyrecipe.io import atomic_path

PLAIN = RecordFormat()

FORMAT_VERSION = 1
META_KEY = "tinyrecipe"
# Where each document's boundaries are marked. TinyLlama's own prep used BOS only.
BOUNDARIES = {"bos_eos": (True, True), "bos": (True, False), "eos": (False, True)}
ENCODE_BATCH = 512  # documents per encode_batch call
CHUNK_TOKENS = 2049 * 1024
# Metadata that differs between the parts of one sharded preparation (everything else must agree).
PER_PART = frozenset(
    {
        "fingerprint",
        "documents",
        "tokens",
        "text_bytes",
        "skipped",
        "inputs",
        "input_bytes",
        "input_ids",
        "documents_per_input",
        "shard",
    }
)


def in_validation(key: str, permille: float) -> bool:
    """The one validation split of tinyrecipe, for corpora without a validation set: `permille`
    of the documents by a hash of their content, so the split is stable across runs, file order
    and worker count."""
    return zlib.crc32(key.encode("utf-8", errors="replace")) % 1000 < permille


@dataclass
class SplitSummary:
    """What one prepared split holds and what was skipped."""

    split: str
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents kept
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    reused: bool = False
    merged: int = 0  # parts merged into it
    staged: tuple[Path, Path] | None = None  # (complete temporary dir, final dir) to publish
    skips_as: str | None = None  # the split read from the same files, whose line counts the skips

    def line(self) -> str:
        rate = self.text_bytes / 1e6 / self.seconds if self.seconds else 0.0
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        if self.skips_as:
            skipped = f"as {self.skips_as} (the same files)"
        how = f"{self.seconds:.1f} s, {rate:.2f} MB/s"
        if self.reused:
            how = "already prepared, reused"
        elif self.merged:
            how = f"{self.merged} parts merged in {self.seconds:.1f} s"
        return (
            f"{self.split}: {self.documents:,} documents, {self.tokens:,} tokens ({how}); "
            f"skipped: {skipped}"
        )


# ---- worker side -------------------------------------------------------------------------------

_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = TextTokenizer(tokenizer_dir)


def _tokenize_file(job: tuple) -> tuple[list[np.ndarray], Counter, int]:
    """Tokenize one input file: (documents as token arrays, skip counts, UTF-8 text bytes kept)."""
    path, fmt, boundary, keep, permille, dtype = job
    tok = _worker_tokenizer
    bos, eos = BOUNDARIES[boundary]
    skipped: Counter = Counter()
    docs: list[np.ndarray] = []
    texts: list[str] = []
    text_bytes = 0

    def flush() -> None:
        for ids in tok.encode_batch(texts):
            ids = ([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else [])
            docs.append(np.asarray(ids, dtype=dtype))
        texts.clear()

    for text, reason in read_records(Path(path), fmt):
        if reason is not None:
            skipped[reason] += 1
            continue
        if keep is not None and in_validation(text, permille) != (keep == "validation"):
            continue  # belongs to the other split of a corpus split by content hash
        texts.append(text)
        text_bytes += len(text.encode("utf-8"))
        if len(texts) >= ENCODE_BATCH:
            flush()
    flush()
    return docs, skipped, text_bytes


# ---- main side ---------------------------------------------------------------------------------


SAMPLE_BYTES = 1 << 16  # an input's identity reads its first and last 64 KiB


def input_id(path: Path) -> str:
    """An input file's identity for reuse: its resolved path, size, modification time and its
    first and last 64 KiB (the whole of a smaller file), hashed. A file edited, replaced or
    read from another directory gets another one; reading it costs two small reads, not a pass."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if st.st_size > 2 * SAMPLE_BYTES:
            f.seek(-SAMPLE_BYTES, os.SEEK_END)
        h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def _fingerprint(input_ids: list[str], tokenizer_sha: str, options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(tokenizer_sha.encode())
    for ident in input_ids:
        h.update(ident.encode())
    return h.hexdigest()


def read_metadata(split_dir: str | Path) -> dict:
    """Our metadata of a prepared split (from its index.json), or {} when it has none."""
    index = Path(split_dir) / "index.json"
    if not index.is_file():
        return {}
    return json.loads(index.read_text()).get(META_KEY, {})


def split_options(
    fmt: RecordFormat, boundary: str, chunk_tokens: int, keep: str | None, val_permille: float
) -> dict:
    """The preparation options a split's metadata (and fingerprint) records."""
    return dict(
        format=FORMAT_VERSION,
        **fmt.options(),
        boundary=boundary,
        chunk_tokens=chunk_tokens,
        keep=keep,
        val_permille=val_permille,
    )


def _clear_stale(final: Path) -> None:
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):  # an interrupted run's
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` into `final`, swapping out an older preparation only now."""
    failpoint("prep.rename")
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def _write_index(tmp: Path, meta: dict, empty: bool = False) -> None:
    index_path = tmp / "index.json"
    index = {"chunks": [], "config": None} if empty else json.loads(index_path.read_text())
    index[META_KEY] = dict(sorted(meta.items()))
    index_path.write_text(json.dumps(index, indent=1))


def prepare_split(
    split: str,
    files: list[Path],
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    fmt: RecordFormat = PLAIN,
    boundary: str = "bos_eos",
    num_workers: int | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    keep: str | None = None,
    val_permille: float = 0,
    shard: tuple[int, int] | None = None,
    publish: bool = True,
) -> SplitSummary:
    """Tokenize `files` into the litdata directory `out_dir/split`. See the module docstring.

    `keep` ("train"/"validation") with `val_permille` splits a corpus by content hash. A shard's
    split may be empty (its files hold no document of this split); any other split may not.
    `publish=False` leaves the complete split in a temporary directory (`summary.staged`) for
    the caller to publish with the others (`publish_splits`).
    """
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary={boundary!r} is unknown; use one of {', '.join(BOUNDARIES)}")
    if not files and shard is None:
        raise ValueError(f"no input files for split '{split}'")
    tokenizer = TextTokenizer(tokenizer_dir)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    options = split_options(fmt, boundary, chunk_tokens, keep, val_permille)
    input_ids = [input_id(f) for f in files]
    fingerprint = _fingerprint(input_ids, tokenizer.sha256, options)
    final = Path(out_dir) / split
    summary = SplitSummary(split)
    _clear_stale(final)
    meta = read_metadata(final)
    if meta.get("fingerprint") == fingerprint:  # complete and identical: nothing to do
        summary.documents, summary.tokens = meta["documents"], meta["tokens"]
        summary.skipped, summary.reused = Counter(meta["skipped"]), True
        return summary

    created = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{split}.tmp-{os.getpid()}"
    start = time.perf_counter()
    writer = BinaryWriter(str(tmp), chunk_size=chunk_tokens, item_loader=TokensLoader())
    jobs = [(str(f), fmt, boundary, keep, val_permille, dtype) for f in files]
    workers = min(num_workers if num_workers is not None else os.cpu_count() or 1, len(jobs))
    if workers > 1:
        # fork: works from scripts without a __main__ guard and from notebooks; the parent has
        # not run the tokenizer yet, so no thread pool is forked mid-flight.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(
            workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)
        )
        results = pool.imap(_tokenize_file, jobs)  # ordered: output independent of workers
    else:
        pool = None
        _init_worker(str(tokenizer_dir))
        results = map(_tokenize_file, jobs)
    per_input: list[int] = []
    try:
        for docs, skipped, nbytes in results:
            per_input.append(len(docs))
            for doc in docs:
                writer[summary.documents] = doc
                failpoint("prep.document")
                summary.documents += 1
                summary.tokens += len(doc)
            summary.skipped.update(skipped)
            summary.text_bytes += nbytes
    finally:
        if pool is not None:
            pool.terminate()
    if summary.documents == 0 and shard is None:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(final.parent.iterdir()):
            final.parent.rmdir()
        raise ValueError(_no_documents(split, files, fmt, summary.skipped, keep, val_permille))
    if summary.documents:
        writer.done()
        writer.merge()
    else:
        tmp.mkdir(parents=True, exist_ok=True)
    _write_index(
        tmp,
        dict(
            options,
            fingerprint=fingerprint,
            tokenizer_sha256=tokenizer.sha256,
            vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            dtype=np.dtype(dtype).name,
            documents=summary.documents,
            tokens=summary.tokens,
            text_bytes=summary.text_bytes,
            skipped=dict(sorted(summary.skipped.items())),
            inputs=[f"{f.parent.name}/{f.name}" for f in files],  # <language>/<file>: Starcoderdata
            input_bytes=[f.stat().st_size for f in files],
            input_ids=input_ids,
            documents_per_input=per_input,
            **({"shard": list(shard)} if shard else {}),
        ),
        empty=summary.documents == 0,
    )
    summary.seconds = time.perf_counter() - start
    if publish:
        _publish(tmp, final)
    else:
        summary.staged = (tmp, final)
    return summary


def publish_splits(summaries: list[SplitSummary]) -> None:
    """Publish the staged splits of `summaries` (all prepared: none is published before)."""
    for summary in summaries:
        if summary.staged is not None:
            _publish(*summary.staged)
            summary.staged = None


def discard_splits(summaries: list[SplitSummary]) -> None:
    """Remove the staged splits of `summaries` (a later split failed)."""
    for summary in summaries:
        if summary.staged is not None:
            shutil.rmtree(summary.staged[0], ignore_errors=True)
            summary.staged = None


def _no_documents(
    split: str,
    files: list[Path],
    fmt: RecordFormat,
    skipped: Counter,
    keep: str | None = None,
    val_permille: float = 0,
) -> str:
    """The one-line error for a split without a usable document; names the fields that exist when
    the text field is in no record, and the options when a hash share holds none."""
    if (
        set(skipped) <= {f"missing_{fmt.text_field}", f"missing_{fmt.text_field}_column"}
        and skipped
    ):
        fields = record_fields(files[0])
        return (
            f"no record of {files[0]} (and {len(files) - 1} more file(s)) has the text field "
            f"'{fmt.text_field}'; its records have: {', '.join(fields) or 'no fields'}; "
            "choose one with --text-field"
        )
    if keep == "validation":
        return (
            f"none of the documents of {files[0]} (and {len(files) - 1} more file(s)) falls in "
            f"the validation share of --val-permille {val_permille:g} (by content hash); for a "
            "corpus this small use a larger --val-permille, 0 (a train split only) or "
            "--validation FILES; nothing was written"
        )
    return (
        f"split '{split}' has no usable documents in {files[0]} (and {len(files) - 1} more "
        f"file(s); skipped: {dict(skipped) or 'none'}); check the input files"
    )


def shard_files(files: list[Path], index: int, count: int) -> list[Path]:
    """The `index`-th (0-based) of `count` contiguous runs of `files`, cut by cumulative bytes, so
    every machine given the same files picks the same parts and the parts in order are `files`."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is out of range; use I/N with 0 <= I < N")
    sizes = [f.stat().st_size for f in files]
    total = max(1, sum(sizes))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.minimum(count - 1, starts * count // total)
    return [f for f, o in zip(files, owner, strict=True) if o == index]


def part_dir(out_dir: str | Path, shard: tuple[int, int]) -> Path:
    """Where shard (i, n) of a preparation into `out_dir` writes its splits."""
    return Path(out_dir) / "parts" / f"{shard[0]}-of-{shard[1]}"


def prepare_corpus(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    fmt: RecordFormat = PLAIN,
    validation: list[str | Path] | None = None,
    val_permille: float = 5,
    shard: tuple[int, int] | None = None,
    **options,
) -> list[SplitSummary]:
    """`inputs` (files, directories, globs; any format of `readers`) -> `out_dir/{train,validation}`.

    With `validation` inputs those files are the validation split; otherwise `val_permille` of the
    documents (by content hash, `in_validation`) are held out (0: a train split only). With
    `shard=(i, n)` only the i-th part of the files is prepared, into `part_dir(out_dir, shard)`.
    The splits are published together once all are complete: a failed one writes nothing.
    """
    files = expand_inputs(inputs)
    if validation:
        plan = [("train", files, None), ("validation", expand_inputs(validation), None)]
    elif val_permille > 0:
        plan = [("train", files, "train"), ("validation", files, "validation")]
    else:
        plan = [("train", files, None)]
    target = Path(out_dir)
    if shard is not None:
        target = part_dir(out_dir, shard)
        plan = [(split, shard_files(fs, *shard), keep) for split, fs, keep in plan]
    existed = target.exists()
    summaries: list[SplitSummary] = []
    try:
        for split, fs, keep in plan:
            summary = prepare_split(
                split,
                fs,
                target,
                tokenizer_dir,
                fmt,
                keep=keep,
                val_permille=val_permille if keep else 0,
                shard=shard,
                publish=False,
                **options,
            )
            if keep == "validation":  # a share of the train split's files: the same skips
                summary.skips_as = "train"
            summaries.append(summary)
    except BaseException:  # no split published: a failed run writes nothing
        discard_splits(summaries)
        if not existed and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        raise
    publish_splits(summaries)
    return summaries


def split_documents(split_dir: str | Path) -> Iterator[np.ndarray]:
    """The documents of a local prepared split, in order (from litdata's chunk layout: a uint32
    item count, count + 1 byte offsets, then the items)."""
    split_dir = Path(split_dir)
    index = json.loads((split_dir / "index.json").read_text())
    dtype = np.dtype(index[META_KEY].get("dtype", "uint16"))
    for chunk in index["chunks"]:
        raw = np.fromfile(split_dir / chunk["filename"], dtype=np.uint8)
        count = int(raw[:4].view(np.uint32)[0])
        offsets = raw[4 : 4 * (count + 2)].view(np.uint32)
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            yield raw[a:b].view(dtype)


def merge_parts(
    parts: list[str | Path], out_dir: str | Path, remove_parts: bool = False
) -> list[SplitSummary]:
    """One split per split name from the parts of a sharded preparation (see the module
    docstring). Every part must be there, complete and prepared alike; otherwise one line names
    the part and nothing is written. The merged splits equal a one-shot preparation byte for
    byte (chunks and index.json)."""
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    metas = _check_parts([Path(p) for p in parts])
    out_dir = Path(out_dir)
    done: list[tuple[Path, Path]] = []
    summaries = []
    try:
        for split, by_part in metas.items():
            start = time.perf_counter()
            final = out_dir / split
            _clear_stale(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{split}.tmp-{os.getpid()}"
            first = by_part[0][1]
            writer = BinaryWriter(
                str(tmp), chunk_size=first["chunk_tokens"], item_loader=TokensLoader()
            )
            summary = SplitSummary(split, merged=len(by_part))
            merged: dict = {k: v for k, v in first.items() if k not in PER_PART}
            lists = {"inputs": [], "input_bytes": [], "input_ids": [], "documents_per_input": []}
            for path, meta in by_part:
                if meta["documents"]:
                    for doc in split_documents(path):
                        writer[summary.documents] = doc
                        summary.documents += 1
                summary.tokens += meta["tokens"]
                summary.text_bytes += meta.get("text_bytes", 0)
                summary.skipped.update(meta["skipped"])
                for key in lists:
                    lists[key] += meta.get(key, [])  # input_ids: absent from older parts
            if summary.documents == 0:
                raise ValueError(f"the parts hold no document of split '{split}'; nothing merged")
            writer.done()
            writer.merge()
            options = {k: merged[k] for k in split_options(PLAIN, "", 0, None, 0)}
            _write_index(
                tmp,
                dict(
                    merged,
                    fingerprint=_fingerprint(
                        lists["input_ids"], merged["tokenizer_sha256"], options
                    ),
                    documents=summary.documents,
                    tokens=summary.tokens,
                    text_bytes=summary.text_bytes,
                    skipped=dict(sorted(summary.skipped.items())),
                    **lists,
                ),
            )
            done.append((tmp, final))
            summary.seconds = time.perf_counter() - start
            summaries.append(summary)
    except BaseException:
        for tmp, _ in done:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tmp, final in done:  # every split complete: publish them
        _publish(tmp, final)
    if remove_parts:
        for path, _ in (pm for by_part in metas.values() for pm in by_part):
            shutil.rmtree(path, ignore_errors=True)
    return summaries


def _check_parts(parts: list[Path]) -> dict[str, list[tuple[Path, dict]]]:
    """{split: [(part's split dir, its metadata)] in shard order}, or a one-line error naming the
    missing, unfinished or different part."""
    if not parts:
        raise ValueError("merge needs the part directories (out/parts/*) to merge")
    found: dict[int, tuple[Path, dict[str, dict]]] = {}
    count = None
    for part in parts:
        if not part.is_dir():
            raise FileNotFoundError(f"part '{part}' does not exist; pass the parts' directories")
        splits = {p.name: read_metadata(p) for p in sorted(part.iterdir()) if p.is_dir()}
        splits = {name: meta for name, meta in splits.items() if meta}
        shards = {tuple(m.get("shard") or ()) for m in splits.values()}
        if len(shards) != 1 or not next(iter(shards)):
            raise ValueError(
                f"'{part}' holds no complete part of a sharded preparation (a failed or unfinished "
                "job, or not made with --shard); rerun its job"
            )
        ((index, n),) = shards
        if count is not None and n != count:
            raise ValueError(f"part '{part}' is one of {n} parts, the others of {count}")
        count = n
        if index in found:
            raise ValueError(f"parts '{found[index][0]}' and '{part}' are both part {index}/{n}")
        found[index] = (part, splits)
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise ValueError(
            f"part(s) {', '.join(f'{i}/{count}' for i in missing)} missing (failed or not run); "
            "rerun them with --shard I/N, nothing was merged"
        )
    names = sorted({name for _, splits in found.values() for name in splits})
    reference = None
    out: dict[str, list[tuple[Path, dict]]] = {name: [] for name in names}
    for index in range(count):
        part, splits = found[index]
        for name in names:
            if name not in splits:
                raise ValueError(
                    f"part {index}/{count} ('{part}') has no complete '{name}' split (a failed or "
                    "unfinished job); rerun it, nothing was merged"
                )
            meta = splits[name]
            same = {k: v for k, v in meta.items() if k not in PER_PART}
            if reference is None:
                reference = (name, same)
            elif name == reference[0] and same != reference[1]:
                key = next(
                    k
                    for k in sorted(set(same) | set(reference[1]))
                    if same.get(k) != reference[1].get(k)
                )
                raise ValueError(
                    f"part {index}/{count} ('{part}') was prepared with {key}={same.get(key)!r}, "
                    f"part 0 with {reference[1].get(key)!r}; prepare all parts alike"
                )
            out[name].append((part / name, meta))
    return out


def markov_documents(
    n_tokens: int, vocab_size: int, doc_tokens: int = 4096, branching: int = 4, seed: int = 0
) -> list[np.ndarray]:
    """Documents of token ids from a random sparse Markov chain: each token is followed by one of
    `branching` fixed successors, so a model's loss can fall from ln(vocab) to ~ln(branching).
    Data for benchmarks and tests that need no tokenizer (`write_synthetic_split`)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
    n_docs = max(1, n_tokens // doc_tokens)
    docs = np.empty((n_docs, doc_tokens), dtype=np.int64)
    docs[:, 0] = rng.integers(0, vocab_size, size=n_docs)
    choice = rng.integers(0, branching, size=(n_docs, doc_tokens))
    for t in range(1, doc_tokens):
        docs[:, t] = successors[docs[:, t - 1], choice[:, t]]
    dtype = np.uint16 if vocab_size <= 65536 else np.int32
    return [d.astype(dtype) for d in docs]


def write_synthetic_split(
    out_dir: str | Path, docs: list[np.ndarray], vocab_size: int, chunk_tokens: int = 2049 * 64
) -> Path:
    """A prepared split (litdata chunks + our metadata) holding `docs` as they are, for data that
    comes from no tokenizer (its recorded tokenizer is "synthetic")."""
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        writer = BinaryWriter(str(tmp), chunk_size=chunk_tokens, item_loader=TokensLoader())
        for i, doc in enumerate(docs):
            writer[i] = doc
        writer.done()
        writer.merge()
        index = json.loads((tmp / "index.json").read_text())
        index[META_KEY] = dict(
            format=FORMAT_VERSION,
            tokenizer_sha256=f"synthetic-{vocab_size}",
            vocab_size=vocab_size,
            documents=len(docs),
            tokens=int(sum(len(d) for d in docs)),
            dtype=np.dtype(docs[0].dtype).name,
        )
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
    return out_dir


def _root(input_dir: str | Path, corpus: str) -> Path:
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input directory '{root}' does not exist; pass the {corpus} root")
    return root


def prepare_slimpajama(
    input_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path, **options
) -> list[SplitSummary]:
    """SlimPajama `input_dir/{train,validation}/chunk*/*.jsonl.zst` -> `out_dir/{train,validation}`,
    without its GitHub subset: `prepare_corpus` with the `SLIMPAJAMA` record format."""
    root = _root(input_dir, "SlimPajama")
    return prepare_corpus(
        [root / "train"],
        out_dir,
        tokenizer_dir,
        SLIMPAJAMA,
        validation=[root / "validation"],
        **options,
    )


def prepare_starcoder(
    input_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    languages: list[str] | None = None,
    val_permille: float = 5,
    **options,
) -> list[SplitSummary]:
    """Starcoderdata `input_dir/<language>/*.parquet` (`content` column) -> `out_dir/{train,
    validation}`, holding out `val_permille` of the documents by content hash."""
    root = _root(input_dir, "Starcoderdata")
    langs = languages or sorted(p.name for p in root.iterdir() if p.is_dir())
    if not langs:
        raise ValueError(f"input directory '{root}' has no <language>/*.parquet files")
    inputs = [root / lang / "*.parquet" for lang in langs]
    return prepare_corpus(
        inputs, out_dir, tokenizer_dir, STARCODER, val_permille=val_permille, **options
    )


PRESETS = {"slimpajama": prepare_slimpajama, "starcoder": prepare_starcoder}


def iter_texts(paths: list[Path]) -> Iterator[str]:
    """Document texts for tokenizer training: SlimPajama-style JSON lines (its GitHub records left
    out, as in prep), Starcoderdata parquet (`content`), any other file read whole as text."""
    for path in paths:
        if path.suffix == ".parquet":
            records = read_records(path, STARCODER)
        elif path.name.endswith(LINE_SUFFIXES):
            records = read_records(path, SLIMPAJAMA)
        else:
            records = iter([(path.read_text(encoding="utf-8", errors="replace"), None)])
        yield from (text for text, reason in records if reason is None)

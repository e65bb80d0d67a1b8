"""Corpus preparation: raw SlimPajama / Starcoderdata files -> litdata token chunks + metadata.

One prepared split is a litdata directory (`index.json` + `chunk-*.bin`) of token ids, one item
per document (uint16 when the vocab fits), readable by `StreamingDataset(item_loader=
TokensLoader(block_size))`. Our metadata sits in the same `index.json` under "tinyrecipe", so a
remote copy carries it too.

Documents are tokenized in parallel (a process pool over input files, in sorted order) and
written by one writer in file order, so the output is byte-identical whatever the worker count.
A split is built in a temporary directory and renamed into place only when complete; a rerun
with the same inputs, tokenizer and options skips it.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyrecipe.data.tokenizer import TextTokenizer
from tinyrecipe.faults import failpoint
from tinyrecipe.io import atomic_path

FORMAT_VERSION = 1
META_KEY = "tinyrecipe"
# Where each document's boundaries are marked. TinyLlama's own prep used BOS only.
BOUNDARIES = {"bos_eos": (True, True), "bos": (True, False), "eos": (False, True)}
SLIMPAJAMA_DROPPED_SETS = frozenset({"RedPajamaGithub"})
ENCODE_BATCH = 512  # documents per encode_batch call

# A reader yields (text, None) for a document or (None, reason) for a skipped record.
Record = tuple[str | None, str | None]


def read_slimpajama(path: Path) -> Iterator[Record]:
    """Records of one SlimPajama `*.jsonl.zst` (or plain `.jsonl`) file.

    Skips, by reason: non_utf8, malformed_json, missing_text, empty, dropped_<set> (the GitHub
    subset), truncated_file (a zstd stream cut short: the complete lines before the cut are kept).
    """
    buffer = b""
    try:
        for block in _decompressed_blocks(path):
            buffer += block
            *lines, buffer = buffer.split(b"\n")
            yield from (_slimpajama_record(line) for line in lines if line.strip())
    except TruncatedFile:
        yield None, "truncated_file"
        return
    if buffer.strip():
        yield _slimpajama_record(buffer)


class TruncatedFile(Exception):
    """A compressed file whose last zstd frame never ends."""


def _decompressed_blocks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of a .zst file (any number of frames) or raw bytes of another file.

    zstandard's stream reader returns a silent EOF on a cut file; a decompressobj per frame
    tells a finished frame from a cut one.
    """
    import zstandard

    with open(path, "rb") as f:
        if path.suffix != ".zst":
            while block := f.read(size):
                yield block
            return
        dobj, pending = None, False
        while raw := f.read(size):
            while raw:
                if dobj is None:
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as err:
                    raise TruncatedFile(str(err)) from err
                pending = True
                if out:
                    yield out
                raw = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj, pending = None, False
        if pending:
            raise TruncatedFile(str(path))


def _slimpajama_record(line: bytes) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None, "malformed_json"
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return None, "missing_text"
    meta = obj.get("meta")
    set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    if set_name in SLIMPAJAMA_DROPPED_SETS:
        return None, f"dropped_{set_name}"
    if not obj["text"].strip():
        return None, "empty"
    return obj["text"], None


def read_starcoder(path: Path) -> Iterator[Record]:
    """Records of one Starcoderdata parquet file (`content` column).

    Skips: missing_content (null), empty, missing_content_column (a whole file without the
    column counts once), unreadable_file.
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception:
        yield None, "unreadable_file"
        return
    if "content" not in parquet.schema_arrow.names:
        yield None, "missing_content_column"
        return
    for batch in parquet.iter_batches(columns=["content"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                yield None, "missing_content"
            elif not text.strip():
                yield None, "empty"
            else:
                yield text, None


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

    def line(self) -> str:
        rate = self.text_bytes / 1e6 / self.seconds if self.seconds else 0.0
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        how = (
            "already prepared, reused" if self.reused else f"{self.seconds:.1f} s, {rate:.2f} MB/s"
        )
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
    path, reader_name, boundary, keep, permille, dtype = job
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

    for text, reason in READERS[reader_name](Path(path)):
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


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    "slimpajama": read_slimpajama,
    "starcoder": read_starcoder,
}


# ---- main side ---------------------------------------------------------------------------------


def _fingerprint(files: list[Path], tokenizer: TextTokenizer, options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(tokenizer.sha256.encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def read_metadata(split_dir: str | Path) -> dict:
    """Our metadata of a prepared split (from its index.json), or {} when it has none."""
    index = Path(split_dir) / "index.json"
    if not index.is_file():
        return {}
    return json.loads(index.read_text()).get(META_KEY, {})


def prepare_split(
    split: str,
    files: list[Path],
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    reader: str,
    boundary: str = "bos_eos",
    num_workers: int | None = None,
    chunk_tokens: int = 2049 * 1024,
    keep: str | None = None,
    val_permille: int = 0,
) -> SplitSummary:
    """Tokenize `files` into the litdata directory `out_dir/split`. See the module docstring.

    `keep` ("train"/"validation") with `val_permille` splits a corpus by content hash.
    """
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary={boundary!r} is unknown; use one of {', '.join(BOUNDARIES)}")
    if not files:
        raise ValueError(f"no input files for split '{split}'")
    tokenizer = TextTokenizer(tokenizer_dir)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    options = dict(
        format=FORMAT_VERSION,
        reader=reader,
        boundary=boundary,
        chunk_tokens=chunk_tokens,
        keep=keep,
        val_permille=val_permille,
    )
    fingerprint = _fingerprint(files, tokenizer, options)
    final = Path(out_dir) / split
    summary = SplitSummary(split)
    for pattern in (f".{split}.tmp-*", f".{split}.old-*"):  # left by an interrupted run
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    meta = read_metadata(final)
    if meta.get("fingerprint") == fingerprint:  # complete and identical: nothing to do
        summary.documents, summary.tokens = meta["documents"], meta["tokens"]
        summary.skipped, summary.reused = Counter(meta["skipped"]), True
        return summary

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{split}.tmp-{os.getpid()}"
    start = time.perf_counter()
    writer = BinaryWriter(str(tmp), chunk_size=chunk_tokens, item_loader=TokensLoader())
    jobs = [(str(f), reader, boundary, keep, val_permille, dtype) for f in files]
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
    if summary.documents == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"split '{split}' has no usable documents in {len(files)} file(s) under "
            f"{files[0].parent} (skipped: {dict(summary.skipped) or 'none'}); check the input files"
        )
    writer.done()
    writer.merge()
    index_path = tmp / "index.json"
    index = json.loads(index_path.read_text())
    index[META_KEY] = dict(
        options,
        fingerprint=fingerprint,
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        dtype=np.dtype(dtype).name,
        documents=summary.documents,
        tokens=summary.tokens,
        skipped=dict(summary.skipped),
        inputs=[f"{f.parent.name}/{f.name}" for f in files],  # <language>/<file> for Starcoderdata
        documents_per_input=per_input,
    )
    index_path.write_text(json.dumps(index, indent=1))
    failpoint("prep.rename")
    if final.exists():  # an older, different preparation: swap it out only once ours is complete
        old = final.parent / f".{split}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    summary.seconds = time.perf_counter() - start
    return summary


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


def _files(root: Path, pattern: str) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"input directory '{root}' does not exist; pass the corpus root")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"input directory '{root}' has no files matching '{pattern}'")
    return files


def prepare_slimpajama(
    input_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path, **options
) -> list[SplitSummary]:
    """SlimPajama `input_dir/{train,validation}/chunk*/*.jsonl.zst` -> `out_dir/{train,validation}`."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"input directory '{root}' does not exist; pass the SlimPajama root"
        )
    return [
        prepare_split(
            split,
            _files(root / split, "**/*.jsonl*"),
            out_dir,
            tokenizer_dir,
            "slimpajama",
            **options,
        )
        for split in ("train", "validation")
    ]


def prepare_starcoder(
    input_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    languages: list[str] | None = None,
    val_permille: int = 5,
    **options,
) -> list[SplitSummary]:
    """Starcoderdata `input_dir/<language>/*.parquet` -> `out_dir/{train,validation}`.

    Starcoderdata has no validation set: `val_permille` of the documents (by content hash)
    are held out.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"input directory '{root}' does not exist; pass the Starcoderdata root"
        )
    langs = languages or sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [f for lang in langs for f in _files(root / lang, "*.parquet")]
    if not files:
        raise ValueError(f"input directory '{root}' has no <language>/*.parquet files")
    return [
        prepare_split(
            split,
            files,
            out_dir,
            tokenizer_dir,
            "starcoder",
            keep=split,
            val_permille=val_permille,
            **options,
        )
        for split in ("train", "validation")
    ]


def iter_texts(paths: list[Path]) -> Iterator[str]:
    """Document texts from SlimPajama-style jsonl(.zst), Starcoderdata parquet, or plain .txt files."""
    for path in paths:
        if path.suffix == ".parquet":
            records = read_starcoder(path)
        elif path.name.endswith((".jsonl", ".jsonl.zst")):
            records = read_slimpajama(path)
        else:
            records = iter([(path.read_text(encoding="utf-8", errors="replace"), None)])
        yield from (text for text, reason in records if reason is None)

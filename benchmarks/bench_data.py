"""Data-path throughput: prep (SlimPajama's zstd JSONL, and the same text as .jsonl, .jsonl.gz,
.parquet, .arrow and .txt through `tinyrecipe prepare`'s reader -> litdata chunks) vs raw
`Tokenizer.encode_batch` on the same text and cores, as a ratio per format; and the mixed loader's tokens/s, with the plain two-level
shuffle (a window of 1 chunk) and a window of 128 chunks, reading local chunks directly and
through litdata's download cache (`local:` paths, as remote data is read): tokens/s, distinct
chunks per batch, and the cache's size on disk.

    python benchmarks/bench_data.py [--max-mb 3] [--workers 2] [--vocab 8192] [--repeat 8] [--json]

Builds the stdlib sample corpus and a tokenizer in a temporary directory (nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tinyrecipe.data import DataSource, MixedStreamingDataModule  # noqa: E402
from tinyrecipe.data.mixture import batch_diversity  # noqa: E402
from tinyrecipe.data.prep import iter_texts, prepare_corpus, prepare_slimpajama  # noqa: E402
from tinyrecipe.data.readers import RecordFormat  # noqa: E402
from tinyrecipe.data.sample import make_sample  # noqa: E402
from tinyrecipe.data.tokenizer import TextTokenizer, train_bpe_tokenizer  # noqa: E402


def measure_loader(path: str, window: int, args) -> dict:
    """tokens/s of the mixed loader over `path`, and distinct chunks per batch (one source)."""
    dm = MixedStreamingDataModule(
        [DataSource("slim", path, weight=1.0)],
        block_size=args.block_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_window_chunks=window,
    )
    loader = iter(dm.train_dataloader())
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        next(loader)
    seconds = time.perf_counter() - start
    diversity = batch_diversity(dm._train[0], args.batch_size, n_batches=20)
    cache = dm._train[0].cache_dir  # remote-style: the chunk files the workers hold
    files = [f for f in Path(cache).rglob("tinyrecipe-*/*.bin")] if cache else []
    return {
        "cache_mb": sum(f.stat().st_size for f in files) / 1e6,
        "cache_chunks": len(files),
        "tokens_s": args.loader_batches * args.batch_size * args.block_size / seconds,
        "chunks_per_batch": diversity["chunks"],
        "documents_per_batch": diversity["documents"],
        "chunks": diversity["chunks_in_source"],
    }


FORMATS = ("jsonl", "jsonl.gz", "parquet", "arrow", "txt")
SEPARATOR = "\n\x1e\n"  # a record separator no document holds


def write_format(texts: list[str], kind: str, out: Path, n_files: int) -> list[Path]:
    """`texts` as `n_files` files of one format, in order."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    files = []
    for i in range(n_files):
        part = texts[i::n_files]
        path = out / f"part{i:03d}.{kind}"
        if kind in ("jsonl", "jsonl.gz"):
            data = "".join(json.dumps({"text": t}) + "\n" for t in part).encode()
            path.write_bytes(gzip.compress(data, 6) if kind == "jsonl.gz" else data)
        elif kind == "parquet":
            pq.write_table(pa.table({"text": part}), path)
        elif kind == "arrow":
            table = pa.table({"text": part})
            with pa.ipc.new_stream(path, table.schema) as writer:
                writer.write_table(table)
        else:
            path.write_text(SEPARATOR.join(part))
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=3.0, help="sample size per source")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the train files")
    parser.add_argument(
        "--chunk-tokens", type=int, default=2049 * 16, help="prep chunk size (many chunks)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sample(root / "raw", max_mb=args.max_mb, files_per_split=max(2, args.workers * 4))
        slim = root / "raw" / "slimpajama"
        train_bpe_tokenizer(iter_texts(sorted(slim.rglob("*.zst"))), args.vocab, root / "tok")
        # --repeat K: K copies of the train files (new names), to measure steady-state
        # throughput past the pool's fixed start-up cost.
        originals = sorted((slim / "train").rglob("*.jsonl.zst"))
        for k in range(1, args.repeat):
            for f in originals:
                shutil.copy(f, f.with_name(f"copy{k}_{f.name}"))

        # Reference: the tokenizer alone on exactly the text prep keeps, same cores.
        texts = list(iter_texts(sorted((slim / "train").rglob("*.zst"))))
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        tok = TextTokenizer(root / "tok")
        start = time.perf_counter()
        n_tokens = sum(len(e.ids) for e in tok._hf.encode_batch(texts, add_special_tokens=False))
        raw_s = time.perf_counter() - start

        start = time.perf_counter()
        train, _ = prepare_slimpajama(
            slim,
            root / "prep",
            root / "tok",
            num_workers=args.workers,
            chunk_tokens=args.chunk_tokens,
        )
        prep_s = time.perf_counter() - start  # includes pool start-up, reading, zstd, writing

        per_format = {}
        for kind in FORMATS:
            files = write_format(texts, kind, root / "formats" / kind, len(originals))
            fmt = RecordFormat(separator=SEPARATOR if kind == "txt" else None)
            start = time.perf_counter()
            (split,) = prepare_corpus(
                files,
                root / "formats-prep" / kind,
                root / "tok",
                fmt,
                val_permille=0,
                num_workers=args.workers,
                chunk_tokens=args.chunk_tokens,
            )
            seconds = time.perf_counter() - start
            assert split.tokens == n_tokens + 2 * len(texts), (kind, split.tokens)
            per_format[kind] = {"mb_s": text_mb / seconds, "vs_raw": raw_s / seconds}

        loaders = {}
        for window in (1, 128):
            for how, path in (
                ("local", str(root / "prep/train")),
                ("cached", f"local:{root}/prep/train"),
            ):
                loaders[f"window {window}, {how}"] = measure_loader(path, window, args)

    result = {
        "text_mb": text_mb,
        "tokens": n_tokens,
        "workers": args.workers,
        "raw_encode_batch_mb_s": text_mb / raw_s,
        "prep_mb_s": text_mb / prep_s,
        "prep_tokens_s": train.tokens / prep_s,
        "prep_vs_raw": raw_s / prep_s,
        "formats": per_format,
        "loaders": loaders,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{text_mb:.2f} MB of SlimPajama-format text, {n_tokens:,} tokens, {args.workers} workers"
    )
    print(f"raw Tokenizer.encode_batch   {result['raw_encode_batch_mb_s']:8.2f} MB/s")
    print(
        f"prep (zstd jsonl -> chunks)  {result['prep_mb_s']:8.2f} MB/s  {result['prep_tokens_s']:12,.0f} tokens/s"
    )
    print(f"prep / raw                   {result['prep_vs_raw']:8.2f}")
    for kind, row in per_format.items():
        print(f"prep {kind:<23} {row['mb_s']:8.2f} MB/s  {row['vs_raw']:5.2f} x raw")
    for name, row in loaders.items():
        print(
            f"loader, {name:<20} {row['tokens_s']:12,.0f} tokens/s, {row['chunks_per_batch']:5.1f} "
            f"chunks and {row['documents_per_batch']:5.1f} documents per batch of "
            f"{args.batch_size} x {args.block_size + 1} (of {row['chunks']} chunks)"
            + (
                f", cache {row['cache_chunks']} chunks = {row['cache_mb']:.1f} MB"
                if row["cache_chunks"]
                else ""
            )
        )


if __name__ == "__main__":
    main()

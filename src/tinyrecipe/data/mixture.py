"""Reading prepared token data: fixed-size blocks per source and a deterministic weighted mixture.

Why not litdata's `CombinedStreamingDataset`: with 2 loader workers its mid-epoch resume was
measured inexact here (0 of 27 batches equal, rows repeated). Here every training sample is a
pure function of its global index `i`:

    i -> (source s, k-th draw from s)        by a seeded, periodic mixing schedule
    k -> (epoch, position) -> block          by a seeded shuffle of windows of chunks, then of
                                             the blocks of all chunks in a window together

so the loader state is one number (batches consumed) and resume is exact for any worker count,
across epoch boundaries of any source. Blocks are read by index from litdata
`StreamingDataset`s (local paths or any remote URI litdata supports).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from tinyrecipe.data.position import micro_batch_samples
from tinyrecipe.data.prep import META_KEY
from tinyrecipe.model.loss import IGNORE_INDEX

_REMOVED_AT_EXIT: set[str] = set()


def remove_at_exit(directory: Path) -> None:
    """Delete `directory` when this process exits, a DataLoader worker too (multiprocessing's
    exit finalizers run there; `atexit` handlers do not)."""
    from multiprocessing.util import Finalize

    key = f"{os.getpid()}:{directory}"
    if key not in _REMOVED_AT_EXIT:
        _REMOVED_AT_EXIT.add(key)
        Finalize(None, shutil.rmtree, (str(directory),), {"ignore_errors": True}, exitpriority=0)


class TokenBlocks:
    """One prepared split as blocks of `block_size + 1` tokens (inputs plus shifted targets).

    Blocks never span litdata chunks; each chunk's tail shorter than a block is left unused
    (never padded with separators). `draw(k)` gives the k-th block of an endless shuffled
    stream: each epoch the chunks are put in a new random order and cut into windows of
    `window_chunks` chunks; the blocks of a window are shuffled together, so consecutive draws
    come from up to `window_chunks` chunks (a chunk holds adjacent documents: one chunk per
    batch makes correlated batches). `window_chunks=1` is the plain two-level shuffle (chunk
    order, then blocks within a chunk). `block(j)` is the j-th block in file order.
    """

    def __init__(
        self,
        path: str,
        block_size: int,
        seed: int = 0,
        prepare: str | None = None,
        window_chunks: int = 1,
        cache_dir: str | None = None,
    ) -> None:
        if window_chunks < 1:
            raise ValueError(f"data.shuffle_window_chunks={window_chunks} must be at least 1")
        self.path, self.block_size, self.seed = str(path), block_size, seed
        self.window_chunks = window_chunks
        self.cache_root = cache_dir
        self._dataset = None
        self._chunks: OrderedDict[int, np.memmap] = OrderedDict()
        self._downloader = None
        check_split(self.path, prepare)
        self.local = not is_remote(self.path)
        if self.local:
            self.cache_dir = None
            index = json.loads((Path(self.path) / "index.json").read_text())
        else:  # litdata fetches the index into its cache (on the first len())
            dataset = self._open()
            litdata_blocks = len(dataset)
            self.cache_dir = dataset.input_dir.path
            index = json.loads((Path(self.cache_dir) / "index.json").read_text())
        self.meta: dict = index.get(META_KEY, {})
        self._index_chunks = index["chunks"]
        width = block_size + 1
        self.blocks_per_chunk = np.array(
            [c["dim"] // width for c in index["chunks"]], dtype=np.int64
        )
        self.chunk_start = np.concatenate([[0], np.cumsum(self.blocks_per_chunk)[:-1]])
        self.n_blocks = int(self.blocks_per_chunk.sum())
        if not self.local and self.n_blocks != litdata_blocks:  # our arithmetic must be litdata's
            raise RuntimeError(
                f"{path}: {self.n_blocks} blocks by index.json, litdata says {litdata_blocks}"
            )
        if self.n_blocks == 0:
            raise ValueError(
                f"data dir '{path}' has no block of {width} tokens; prepare more data or lower block_size"
            )
        self._dataset = None  # opened again lazily in each loader worker
        self._epoch_cache: tuple | None = None
        self._chunk_cache: tuple | None = None

    def _open(self):
        from litdata import StreamingDataset
        from litdata.streaming.item_loader import TokensLoader

        if self._dataset is None:
            from litdata.utilities.env import _DistributedEnv

            dataset = StreamingDataset(
                self.path,
                item_loader=TokensLoader(block_size=self.block_size + 1),
                shuffle=False,
                cache_dir=self.cache_root,
            )
            # Blocks are read by global index and ranks are split by MixedBlockStream, so litdata
            # must see the whole dataset on every rank (it would otherwise shard by rank).
            dataset.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
            self._dataset = dataset
        return self._dataset

    def __getstate__(self) -> dict:
        return dict(
            self.__dict__,
            _dataset=None,
            _chunks=OrderedDict(),
            _downloader=None,
            _epoch_cache=None,
            _chunk_cache=None,
        )

    def _chunk(self, c: int) -> np.memmap:
        """Chunk c's tokens, memory-mapped. A litdata token chunk is a uint32 header (the item
        count, then count + 1 offsets) followed by the tokens (litdata's writer.py). Reading it
        here instead of through litdata's reader keeps random access across many chunks (the
        shuffle window) off litdata's prefetch thread, which lost track of its open chunks
        (KeyError in TokensLoader.close, litdata 0.2.76). Remote chunks are fetched by litdata's
        own downloader into a directory of this process's inside litdata's cache (loader
        workers never delete each other's files); at most 2 x window_chunks (>= 8) of them stay
        there, the least recently used are deleted, and the directory goes when the process
        exits (a loader worker included)."""
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        info = self._index_chunks[c]
        if self.local:
            path = Path(self.path) / info["filename"]
        else:
            mine = Path(self.cache_dir) / f"tinyrecipe-{os.getpid()}"
            path = mine / info["filename"]
            if not path.is_file():
                if self._downloader is None:
                    from litdata.streaming.downloader import get_downloader

                    remove_at_exit(mine)
                    mine.mkdir(parents=True, exist_ok=True)
                    allow_plain_http(self.path)
                    self._downloader = get_downloader(self.path, str(mine), self._index_chunks)
                self._downloader.download_chunk_from_index(c)
        self._chunks[c] = np.memmap(
            path,
            dtype=np.dtype(self.meta.get("dtype", "uint16")),
            mode="r",
            offset=(2 + info["chunk_size"]) * 4,
        )
        keep = max(8, 2 * self.window_chunks)
        while not self.local and len(self._chunks) > keep:
            old, _ = self._chunks.popitem(last=False)
            (path.parent / self._index_chunks[old]["filename"]).unlink(missing_ok=True)
        return self._chunks[c]

    def __len__(self) -> int:
        return self.n_blocks

    def block(self, j: int) -> np.ndarray:
        """The j-th block in stored order (validation reads these)."""
        c = int(np.searchsorted(self.chunk_start, j, side="right")) - 1
        width = self.block_size + 1
        offset = (j - int(self.chunk_start[c])) * width
        return np.array(self._chunk(c)[offset : offset + width])

    def draw(self, k: int) -> np.ndarray:
        """The k-th block of the shuffled endless stream (a pure function of k)."""
        return self.block(self.locate(k))

    def locate(self, k: int) -> int:
        """The stored index of the k-th drawn block."""
        epoch, position = divmod(k, self.n_blocks)
        K = self.window_chunks
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.blocks_per_chunk)
            )
            sizes = np.add.reduceat(self.blocks_per_chunk[order], np.arange(0, len(order), K))
            self._epoch_cache = (epoch, order, np.cumsum(sizes))
        _, order, ends = self._epoch_cache
        slot = int(np.searchsorted(ends, position, side="right"))  # the window
        within = position - (int(ends[slot - 1]) if slot else 0)
        if self._chunk_cache is None or self._chunk_cache[:2] != (epoch, slot):
            chunks = order[slot * K : (slot + 1) * K]
            # one chunk: seeded by the chunk (the two-level shuffle as it always was)
            key = [self.seed, epoch, int(chunks[0])] if K == 1 else [self.seed, epoch, slot, K]
            perm = np.random.default_rng(key).permutation(int(self.blocks_per_chunk[chunks].sum()))
            self._chunk_cache = (
                epoch,
                slot,
                chunks,
                np.cumsum(self.blocks_per_chunk[chunks]),
                perm,
            )
        _, _, chunks, chunk_ends, perm = self._chunk_cache
        j = int(perm[within])  # the j-th block of the window, counted chunk after chunk
        c = int(np.searchsorted(chunk_ends, j, side="right"))
        offset = j - (int(chunk_ends[c - 1]) if c else 0)
        return int(self.chunk_start[int(chunks[c])] + offset)


def batch_diversity(blocks: TokenBlocks, batch_blocks: int, n_batches: int = 20) -> dict:
    """What `n_batches` consecutive batches of `batch_blocks` draws from one source hold, on
    average per batch: distinct chunks, distinct documents (from the BOS/EOS boundaries in the
    tokens) and distinct input directories (Starcoderdata's languages; from the metadata). Reads
    only the chunks the batches touch; documents and languages are None where the data lacks
    the metadata to tell."""
    meta = blocks.meta
    boundary, width = meta.get("boundary"), blocks.block_size + 1
    chunk_end = blocks.chunk_start + blocks.blocks_per_chunk
    items = [c.get("chunk_size", 0) for c in blocks._index_chunks]  # documents per chunk
    docs_before = np.concatenate([[0], np.cumsum(items)[:-1]]) if items else None
    per_input = meta.get("documents_per_input")
    input_ends = np.cumsum(per_input) if per_input else None
    starts: dict[int, np.ndarray] = {}

    def document_starts(c: int) -> np.ndarray:
        if c not in starts:
            first = int(blocks.chunk_start[c])
            tokens = np.concatenate([blocks.block(j) for j in range(first, int(chunk_end[c]))])
            if boundary in ("bos", "bos_eos"):
                starts[c] = np.flatnonzero(tokens == meta["bos_id"])
            else:
                starts[c] = np.r_[0, np.flatnonzero(tokens == meta["eos_id"]) + 1]
        return starts[c]

    rows = []
    for b in range(n_batches):
        chunks, docs, langs = set(), set(), set()
        for k in range(b * batch_blocks, (b + 1) * batch_blocks):
            j = blocks.locate(k)
            c = int(np.searchsorted(chunk_end, j, side="right"))
            chunks.add(c)
            if boundary is None:
                continue
            offset = (j - int(blocks.chunk_start[c])) * width
            doc_starts = document_starts(c)
            first = max(0, int(np.searchsorted(doc_starts, offset, side="right")) - 1)
            last = max(0, int(np.searchsorted(doc_starts, offset + width - 1, side="right")) - 1)
            for d in range(first, last + 1):
                docs.add((c, d))
                if docs_before is not None and input_ends is not None:
                    which = int(np.searchsorted(input_ends, docs_before[c] + d, side="right"))
                    langs.add(meta["inputs"][min(which, len(meta["inputs"]) - 1)].split("/")[0])
        rows.append((len(chunks), len(docs), len(langs)))
    known = boundary is not None
    return {
        "chunks": sum(r[0] for r in rows) / n_batches,
        "documents": sum(r[1] for r in rows) / n_batches if known else None,
        "languages": sum(r[2] for r in rows) / n_batches if known and per_input else None,
        "chunks_in_source": len(blocks.blocks_per_chunk),
    }


def document_ids(tokens: np.ndarray, meta: dict, path: str) -> np.ndarray:
    """Each token's document within a block (0 for the one already running when it starts),
    from the BOS/EOS boundaries prep put in the stream (its policy is in the metadata): a BOS
    starts a document; under the EOS-only policy a document starts after each EOS."""
    boundary = meta.get("boundary")
    if boundary in ("bos", "bos_eos"):
        return np.cumsum(tokens == meta["bos_id"]).astype(np.int64)
    if boundary == "eos":
        ends = np.concatenate([[0], (tokens[:-1] == meta["eos_id"]).astype(np.int64)])
        return np.cumsum(ends)
    raise ValueError(
        f"data dir '{path}' records no document boundaries (metadata boundary={boundary!r}); "
        "prepare it again with tinyrecipe prepare, or set data.document_mask: false"
    )


def is_remote(split: str) -> bool:
    """A path litdata fetches itself (s3://, gs://, ..., or `local:` through its cache)."""
    return "://" in str(split) or str(split).startswith("local:")


def _s3_client(timeout: float = 10):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2})
    return boto3.client("s3", config=config)


def allow_plain_http(split: str) -> None:
    """litdata fetches S3 chunks with obstore, which refuses an http:// endpoint (a MinIO or other
    S3-compatible server inside a cluster) unless its client allows it; litdata builds that
    client from one module-level options dict, so the endpoint's scheme is added there."""
    if not split.startswith("s3://"):
        return
    from litdata.streaming import downloader

    endpoint = _s3_client().meta.endpoint_url or ""
    if endpoint.startswith("http://"):
        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"


def check_remote(split: str) -> None:
    """An s3:// split whose endpoint cannot be reached, whose bucket does not exist, which holds no
    index.json or which the credentials may not read is refused in one line (litdata would retry
    for minutes). The endpoint and credentials are boto3's: AWS_ENDPOINT_URL, AWS_PROFILE, ..."""
    if not split.startswith("s3://"):
        return
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = split[len("s3://") :].partition("/")
    client = _s3_client()
    where = f"'{split}' (endpoint {client.meta.endpoint_url})"
    index = f"{prefix.rstrip('/')}/index.json".lstrip("/")
    try:
        client.head_bucket(Bucket=bucket)
        client.head_object(Bucket=bucket, Key=index)
    except NoCredentialsError:
        raise ValueError(
            f"no credentials to read {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE"
        ) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        op = err.operation_name
        if code in ("404", "NoSuchBucket") and op == "HeadBucket":
            raise FileNotFoundError(f"bucket '{bucket}' of {where} does not exist") from None
        if code in ("404", "NoSuchKey"):
            raise FileNotFoundError(
                f"data dir {where} holds no index.json; upload a prepared split there "
                f"(aws s3 sync DIR {split})"
            ) from None
        raise ValueError(f"cannot read {where}: {code} {op}; check the credentials") from None
    except BotoCoreError as err:
        raise ConnectionError(
            f"cannot reach the storage endpoint of {where}: {type(err).__name__}; check "
            "AWS_ENDPOINT_URL and the network"
        ) from None


def check_split(split: str, prepare: str | None = None) -> None:
    """A local prepared split that is missing, holds no index, has an unreadable index.json or
    lacks a chunk file its index lists is refused here, in the main process, in one line
    (litdata would wait for the chunk as for a hung download, in every loader worker). s3://
    URIs are checked by `check_remote`; other remote URIs are left to litdata."""
    if is_remote(split):
        check_remote(str(split))
        return
    path = Path(split)
    how = f"`{prepare}`" if prepare else "tinyrecipe prepare"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data dir '{path}' does not exist; prepare it with {how} or fix the path in the recipe"
        )
    index_file = path / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"data dir '{path}' holds no prepared data (no index.json); prepare it with {how}"
        )
    try:
        index = json.loads(index_file.read_text())
        files = [c["filename"] for c in index["chunks"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"data index '{index_file}' is unreadable ({type(err).__name__}); prepare the split "
            "again with tinyrecipe prepare"
        ) from None
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data dir '{path}' lacks {len(missing)} of the {len(files)} chunk files its index "
            f"lists (first: {missing[0]}); copy them back or prepare the split again"
        )


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, each within 1 of weights x total (rows of a 2-D array
    each)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = total - counts.sum(axis=-1, keepdims=True)
    order = np.argsort(-(exact - counts), axis=-1, kind="stable")
    ranks = np.argsort(order, axis=-1, kind="stable")
    return counts + (ranks < short)


def _normalise(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"mixture weights {list(weights)} must be non-negative with a positive sum"
        )
    return w / w.sum()


class MixtureSchedule:
    """Which source the i-th sample comes from, and which draw from that source it is.

    The weights may change in stages: `phases` lists (start sample, weights, ramp samples); from
    each start the weights move linearly from the previous phase's to its own over the ramp,
    then hold until the next start. Each segment of constant weights (or one ramp) is cut into
    periods of `period` samples from its own start; a period holds exactly round(weight x period)
    samples of each source (largest remainders; in a ramp, the weights at the period's middle),
    in an order shuffled per period from the seed. So any window of a few periods matches the
    schedule to within ~1/period, `locate(i)` is O(log phases), and adding a phase later never
    changes the samples before it.
    """

    def __init__(
        self,
        weights: list[float] | None = None,
        seed: int = 0,
        period: int = 1024,
        phases: list[tuple[int, list[float], int]] | None = None,
    ) -> None:
        if phases is None:
            phases = [(0, weights, 0)]
        if phases[0][0] != 0:
            raise ValueError("the first mixture phase must start at sample 0")
        self.seed, self.period = seed, period
        self.phases = [(int(a), _normalise(w), int(r)) for a, w, r in phases]
        self.n_sources = len(self.phases[0][1])
        self.weights = self.phases[0][1]
        self.counts = _largest_remainder(self.weights, period)  # the first segment's
        segments = []  # (start, end, weights per period (n, S) or (S,))
        previous = self.phases[0][1]
        for j, (start, w, ramp) in enumerate(self.phases):
            if len(w) != self.n_sources:
                raise ValueError("every mixture phase needs one weight per source")
            end = self.phases[j + 1][0] if j + 1 < len(self.phases) else None
            if end is not None and end <= start:
                raise ValueError(f"mixture phases must start in order (sample {start} >= {end})")
            if ramp > 0:
                ramp_end = start + ramp if end is None else min(start + ramp, end)
                mid = (np.arange(-(-(ramp_end - start) // period)) + 0.5) * period
                t = np.minimum(mid / ramp, 1.0)[:, None]
                segments.append((start, ramp_end, previous + (w - previous) * t))
                if end is None or ramp_end < end:
                    segments.append((ramp_end, end, w))
            else:
                segments.append((start, end, w))
            previous = w
        self._starts = np.array([seg[0] for seg in segments], dtype=np.int64)
        self._cache: tuple | None = None
        self._segments = []
        before = np.zeros(self.n_sources, dtype=np.int64)  # draws before the segment
        for g, (start, end, w) in enumerate(segments):
            counts = _largest_remainder(w, period)
            cumulative = (
                np.concatenate([np.zeros((1, self.n_sources), np.int64), np.cumsum(counts, 0)])
                if counts.ndim == 2
                else None
            )
            self._segments.append((before.copy(), counts, cumulative))
            if end is not None:
                q, r = divmod(end - start, period)
                before += self._draws_before_period(g, q)
                if r:
                    before += self._pattern(g, q)[2][r]

    def _draws_before_period(self, g: int, q: int) -> np.ndarray:
        _, counts, cumulative = self._segments[g]
        return q * counts if cumulative is None else cumulative[q]

    def _pattern(self, g: int, q: int) -> tuple:
        """(key, sources in period q of segment g in order, draws of each source before each
        position)."""
        if self._cache is not None and self._cache[0] == (g, q):
            return self._cache
        counts = self._segments[g][1]
        counts = counts if counts.ndim == 1 else counts[q]
        pattern = np.repeat(np.arange(self.n_sources), counts)
        # the first segment keeps the key it had before stages existed (the same data order)
        np.random.default_rng([self.seed, q] if g == 0 else [self.seed, g, q]).shuffle(pattern)
        onehot = np.eye(self.n_sources, dtype=np.int64)[pattern]
        before = np.cumsum(onehot, axis=0) - onehot
        before = np.concatenate([before, before[-1:] + onehot[-1:]])  # row `period`: all draws
        self._cache = ((g, q), pattern, before)
        return self._cache

    def weights_at(self, i: int) -> np.ndarray:
        """The scheduled weights of each source at sample i (before rounding to periods)."""
        weights = self.phases[0][1]
        for start, w, ramp in self.phases:
            if i < start:
                break
            t = 1.0 if ramp <= 0 else min(1.0, (i - start) / ramp)
            weights = weights + (w - weights) * t
        return weights

    def locate(self, i: int) -> tuple[int, int]:
        """(source, k): sample i is the k-th draw from source."""
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        q, r = divmod(i - int(self._starts[g]), self.period)
        _, pattern, before = self._pattern(g, q)
        s = int(pattern[r])
        k0 = self._segments[g][0]
        return s, int(k0[s]) + int(self._draws_before_period(g, q)[s]) + int(before[r, s])


class MixedBlockStream(IterableDataset):
    """The endless training stream: micro-batch b of this rank holds global samples
    (b x world_size + rank) x batch_size ... + batch_size - 1.

    Loader worker w of W produces micro-batches b = start + w, start + w + W, ...
    (`tinyrecipe.data.position.micro_batch_samples`), the same order for any W.
    Yields dicts of `input_ids` and `labels` (block_size tokens each, int64; labels are the
    inputs shifted by one); the DataLoader's batch_size must equal ours.
    """

    def __init__(
        self,
        sources: list[TokenBlocks],
        schedule: MixtureSchedule,
        batch_size: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        document_mask: bool = False,
    ) -> None:
        self.sources, self.schedule = sources, schedule
        self.batch_size, self.start_batch = batch_size, start_batch
        self.rank, self.world_size = rank, world_size
        self.document_mask = document_mask

    def sample(self, i: int) -> tuple[int, torch.Tensor]:
        """(source, tokens) of global sample i."""
        s, k = self.schedule.locate(i)
        return s, torch.from_numpy(self.sources[s].draw(k).astype(np.int64))

    def __iter__(self):
        for i in micro_batch_samples(self.start_batch, self.batch_size, self.rank, self.world_size):
            s, block = self.sample(i)
            item = {"input_ids": block[:-1], "labels": block[1:]}
            if self.document_mask:
                item["documents"] = _documents(item["input_ids"], self.sources[s])
            yield item


def _documents(input_ids: torch.Tensor, blocks: TokenBlocks) -> torch.Tensor:
    return torch.from_numpy(document_ids(input_ids.numpy(), blocks.meta, blocks.path))


class SequentialBlocks(Dataset):
    """One split's blocks in stored order (validation), as dicts of `input_ids` and `labels`; with
    `limit`, that many in up to `RUNS` runs of consecutive blocks spread evenly over the split, so
    a split written part by part (Starcoderdata, language after language) is sampled from every
    part while a pass reads few of its chunks (the same blocks on any number of ranks). Index
    `len(self)` and beyond is a padding item whose labels are all -100: `ShardedEvalSampler` uses
    it so every rank runs the same number of batches (none is left out of a collective) while
    the loss counts each real block exactly once."""

    def __init__(
        self, blocks: TokenBlocks, limit: int | None = None, document_mask: bool = False
    ) -> None:
        self.blocks = blocks
        self.n = len(blocks) if limit is None else min(limit, len(blocks))
        self.run = -(-self.n // self.RUNS) if self.n else 1  # blocks per run (the last: fewer)
        self.gap = len(blocks) - self.n  # blocks left out, shared evenly between the runs
        self.runs = max(1, -(-self.n // self.run))
        self.document_mask = document_mask

    RUNS = 64

    def index(self, j: int) -> int:
        """The split's block that item j is: run j // run starts after that share of the gap."""
        return j + (j // self.run) * self.gap // self.runs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if j >= self.n:
            width = self.blocks.block_size
            item = {
                "input_ids": torch.zeros(width, dtype=torch.int64),
                "labels": torch.full((width,), IGNORE_INDEX, dtype=torch.int64),
            }
            if self.document_mask:
                item["documents"] = torch.zeros(width, dtype=torch.int64)
            return item
        block = torch.from_numpy(self.blocks.block(self.index(j)).astype(np.int64))
        item = {"input_ids": block[:-1], "labels": block[1:]}
        if self.document_mask:
            item["documents"] = _documents(item["input_ids"], self.blocks)
        return item


class ShardedEvalSampler(DistributedSampler):
    """Rank r evaluates items r, r + world, ...; the shares are padded to equal length with
    padding items (zero-weight: `SequentialBlocks`, `sft.PaddedExamples`) instead of
    DistributedSampler's repeated real items, so a validation loss does not depend on the number
    of ranks."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        # DistributedSampler already sizes the padded shares: num_samples = ceil(n / world)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

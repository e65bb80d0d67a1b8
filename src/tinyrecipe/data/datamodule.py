"""`MixedStreamingDataModule`: prepared token sources mixed by weight, with exact resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from tinyrecipe.data.mixture import (
    MixedBlockStream,
    MixtureSchedule,
    SequentialBlocks,
    ShardedEvalSampler,
    TokenBlocks,
    document_ids,
)
from tinyrecipe.data.position import CountingLoader, StreamPosition


@dataclass
class DataSource:
    """One prepared corpus: its train (and optional validation) litdata dirs and mixture weight.

    Paths may be local or any URI litdata streams from (s3://, gs://, ...). `prepare` says how
    the data is made (a command); a missing directory's error repeats it.
    """

    name: str
    train: str
    validation: str | None = None
    weight: float = 1.0
    prepare: str | None = None


@dataclass
class Stage:
    """A change of the mixture during training: from `start_tokens` (training tokens seen) or
    `start_step` (optimizer steps) on, the sources draw with `weights` (by name; a source not
    named draws nothing), reached linearly over the first `ramp_tokens` from the previous
    weights. `sources` adds corpora (new names, new directories) that enter here."""

    weights: dict[str, float]
    start_tokens: float | None = None
    start_step: int | None = None
    ramp_tokens: float = 0
    sources: list[DataSource] = field(default_factory=list)


class MixedStreamingDataModule(StreamPosition, L.LightningDataModule):
    """Training batches from `sources` mixed by weight; one validation loader per source.

    Training and validation batches are dicts of `input_ids` and `labels`, int64
    (batch_size, block_size); labels are the inputs shifted by one token.
    `state_dict()` is the number of micro-batches consumed; loading it resumes the exact batch
    sequence whatever `num_workers` is (see `tinyrecipe.data.mixture`).
    `vocab_size` (the model's) and `tokenizer_dir` are checked against the data's metadata.
    `shuffle_window_chunks` (K): a source's blocks are shuffled within windows of K chunks, so a
    batch draws from up to K chunks (adjacent documents) instead of one or two; 128 makes a
    TinyLlama-scale batch (~717 SlimPajama and ~307 Starcoderdata blocks) draw from >= 64 chunks
    of each source that has them (docs/data.md). 1 is the plain two-level shuffle.
    `stages` change the weights during training (`Stage`); `mixing_period` is the number of
    samples over which each source's share is exact (a ramp moves in steps of it).
    `cache_dir`: where chunks of remote sources (s3://, ...) are cached (default: litdata's,
    ~/.lightning/chunks); each loader process keeps at most max(8, 2 x K) of them.
    `document_mask`: batches also carry `documents` (B, T), each token's document inside its
    block (from the BOS/EOS boundaries prep recorded), and the model attends within documents.

    The data position is the number of global samples consumed, so a run resumes on another
    number of processes, micro-batch size or accumulation (same global batch) with the same
    sample sequence; another global batch is refused unless `allow_global_batch_change`.
    """

    def __init__(
        self,
        sources: list[DataSource],
        block_size: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        val_batch_size: int | None = None,
        val_max_blocks: int | None = None,
        vocab_size: int | None = None,
        tokenizer_dir: str | None = None,
        shuffle_window_chunks: int = 128,
        stages: list[Stage] | None = None,
        mixing_period: int = 1024,
        allow_global_batch_change: bool = False,
        document_mask: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("data.sources is empty; list at least one prepared source")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages or []]
        for stage in self.stages:
            stage.sources = [
                s if isinstance(s, DataSource) else DataSource(**s) for s in stage.sources
            ]
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
        self.sources += [s for stage in self.stages for s in stage.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data source names {names} repeat; give each source its own name")
        for n, stage in enumerate(self.stages):
            unknown = set(stage.weights) - set(names)
            if unknown:
                raise ValueError(
                    f"data.stages[{n}].weights names {sorted(unknown)}, not a source; sources: "
                    f"{names} (a new one goes in the stage's sources)"
                )
            if (stage.start_tokens is None) == (stage.start_step is None):
                raise ValueError(
                    f"data.stages[{n}] needs exactly one of start_tokens or start_step"
                )
        self.mixing_period, self.allow_global_batch_change = (
            mixing_period,
            allow_global_batch_change,
        )
        self._schedule: MixtureSchedule | None = None
        self.document_mask = document_mask
        self.block_size, self.batch_size, self.num_workers, self.seed = (
            block_size,
            batch_size,
            num_workers,
            seed,
        )
        self.val_batch_size = val_batch_size or batch_size
        self.val_max_blocks, self.vocab_size, self.tokenizer_dir = (
            val_max_blocks,
            vocab_size,
            tokenizer_dir,
        )
        self.shuffle_window_chunks, self.cache_dir = shuffle_window_chunks, cache_dir
        self.batches_consumed = 0
        self._train: list[TokenBlocks] | None = None
        self._val: list[TokenBlocks] = []

    # -- setup ---------------------------------------------------------------------------------

    def val_sources(self) -> list[tuple[str, float]]:
        """(name, weight) of each validation loader, for the module's val/loss/<name> logs; the
        mixed val/loss is weighted by the first stage's weights (one yardstick for a run)."""
        first = self._first_weights()
        return [(s.name, w) for s, w in zip(self.sources, first, strict=True) if s.validation]

    def _first_weights(self) -> list[float]:
        """The weights at sample 0: the top-level sources' (sources that enter later: 0)."""
        added = {s.name for stage in self.stages for s in stage.sources}
        return [0.0 if s.name in added else s.weight for s in self.sources]

    def prepare_data(self) -> None:
        """`setup` before the run starts (and writes logs): a missing, unreachable or damaged
        split (`check_split`, once each), or one of another tokenizer, is refused there."""
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        self._train = [
            TokenBlocks(
                s.train,
                self.block_size,
                seed=self.seed + n,
                prepare=s.prepare,
                window_chunks=self.shuffle_window_chunks,
                cache_dir=self.cache_dir,
            )
            for n, s in enumerate(self.sources)
        ]
        self._val = [
            TokenBlocks(s.validation, self.block_size, prepare=s.prepare, cache_dir=self.cache_dir)
            for s in self.sources
            if s.validation
        ]
        self._check_metadata()

    def _check_metadata(self) -> None:
        expected_sha = expected_ids = None
        if self.tokenizer_dir is not None:
            from tinyrecipe.data.tokenizer import TextTokenizer

            tok = TextTokenizer(self.tokenizer_dir)
            expected_sha, expected_ids = tok.sha256, (tok.bos_id, tok.eos_id)
        first_sha = None
        for blocks in self._train + self._val:
            meta = blocks.meta
            if not meta:
                raise ValueError(
                    f"data dir '{blocks.path}' has no tinyrecipe metadata in index.json; "
                    "prepare it with tinyrecipe prepare"
                )
            if self.vocab_size is not None and meta["vocab_size"] != self.vocab_size:
                raise ValueError(
                    f"data dir '{blocks.path}' has tokenizer vocab {meta['vocab_size']}, model expects "
                    f"{self.vocab_size} — prepare it again with the model's tokenizer "
                    "(tinyrecipe prepare) or set model.config.vocab_size"
                )
            sha = meta["tokenizer_sha256"]
            if expected_sha is not None and sha != expected_sha:
                raise ValueError(
                    f"data dir '{blocks.path}' was tokenized with another tokenizer than "
                    f"'{self.tokenizer_dir}' — prepare it again with that tokenizer"
                )
            ids = (meta.get("bos_id"), meta.get("eos_id"))
            if expected_ids is not None and "bos_id" in meta and ids != expected_ids:
                raise ValueError(
                    f"data dir '{blocks.path}' marks documents with BOS/EOS ids {ids}, the "
                    f"tokenizer '{self.tokenizer_dir}' uses {expected_ids} — prepare it again "
                    "with that tokenizer"
                )
            if first_sha is not None and sha != first_sha:
                raise ValueError(
                    f"data dir '{blocks.path}' was tokenized with another tokenizer than "
                    f"'{self._train[0].path}'; all sources must share one tokenizer"
                )
            first_sha = sha
            if self.document_mask:  # refused here, in one line, not inside a loader worker
                document_ids(np.zeros(1, dtype=np.int64), meta, blocks.path)

    @property
    def schedule(self) -> MixtureSchedule:
        """Which source each global sample comes from (built once the global batch is known)."""
        if self._schedule is None:
            self._schedule = MixtureSchedule(
                seed=self.seed, period=self.mixing_period, phases=self.phases()
            )
        return self._schedule

    def phases(self) -> list[tuple[int, list[float], int]]:
        """The stages as (start sample, weights per source, ramp samples), the first at 0."""
        names = [s.name for s in self.sources]
        out = [(0, self._first_weights(), 0)]
        for n, stage in enumerate(self.stages):
            if stage.start_tokens is not None:
                start = round(stage.start_tokens / self.block_size)
            else:
                start = stage.start_step * self.global_batch()
            if start <= out[-1][0]:
                raise ValueError(
                    f"data.stages[{n}] starts at sample {start}, not after the stage before it "
                    f"(sample {out[-1][0]}); list stages in order"
                )
            if start < out[-1][0] + out[-1][2]:  # its weights would jump from the ramp's target
                raise ValueError(
                    f"data.stages[{n}] starts at sample {start}, inside the ramp of the stage "
                    f"before it (to sample {out[-1][0] + out[-1][2]}); start it after the ramp "
                    "or shorten ramp_tokens"
                )
            weights = [float(stage.weights.get(name, 0.0)) for name in names]
            out.append((start, weights, round(stage.ramp_tokens / self.block_size)))
        return out

    # -- loaders -------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_world()
        stream = MixedBlockStream(
            self._train,
            self.schedule,
            self.batch_size,
            self.batches_consumed,
            rank,
            world,
            document_mask=self.document_mask,
        )
        return CountingLoader(
            self,
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per source with validation data; batches are dicts (input_ids, labels).
        Ranks split the blocks without repeating any, and all run the same number of batches."""
        self.setup()
        rank, world = self._rank_world()
        loaders = []
        for blocks in self._val:
            dataset = SequentialBlocks(blocks, self.val_max_blocks, self.document_mask)
            loaders.append(
                DataLoader(
                    dataset,
                    batch_size=self.val_batch_size,
                    sampler=ShardedEvalSampler(dataset, rank, world),
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory(),
                )
            )
        return loaders

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.position_state(),
            "block_size": self.block_size,
            "seed": self.seed,
            "sources": [s.name for s in self.sources],
            "phases": [[start, w, ramp] for start, w, ramp in self.phases()],
            "mixing_period": self.mixing_period,
            "shuffle_window_chunks": self.shuffle_window_chunks,
        }

    def resume_position(self, state: dict[str, Any]) -> int:
        """The micro-batches of this run a checkpoint's data state stands for, after checking
        that it continues the same sample sequence; each refusal is one line naming the key."""
        mine = self.state_dict()
        state = {"shuffle_window_chunks": 1, "mixing_period": 1024, **state}  # older checkpoints
        for key in ("block_size", "seed", "shuffle_window_chunks", "mixing_period"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data state in the checkpoint has {key}={state.get(key)!r} but this run has "
                    f"{mine[key]!r}; resume with the same data settings (or start a new run)"
                )
        samples = self.samples_of(state)
        theirs = state.get("phases") or [[0, state["weights"], 0]]
        names = state.get("sources") or [s.name for s in self.sources][: len(theirs[0][1])]
        before = _phases_until(theirs, names, samples)
        drawn = {n for _, weights, _ in before for n in weights}
        placed = names[: max((i + 1 for i, n in enumerate(names) if n in drawn), default=0)]
        if placed != mine["sources"][: len(placed)]:
            raise ValueError(
                f"data.sources in the checkpoint are {names}, this run has {mine['sources']}: "
                f"keep {placed} first and in that order (a source's place seeds its shuffle and "
                "its draws)"
            )
        if before != _phases_until(mine["phases"], mine["sources"], samples):
            raise ValueError(
                f"data.sources/data.stages differ from the checkpoint's before its position "
                f"({samples} samples): only stages that start later may be added or changed"
            )
        return self.position_of(state)


def _phases_until(phases: list, names: list[str], samples: int) -> list:
    """The phases that shape samples before `samples`, weights by source name (rounded), for
    comparing two runs' schedules up to a resume position."""
    return [
        (
            int(start),
            {n: round(float(w), 12) for n, w in zip(names, ws, strict=True) if w},
            int(ramp),
        )
        for start, ws, ramp in phases
        if start < samples
    ]

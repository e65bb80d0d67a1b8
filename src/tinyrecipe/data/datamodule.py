"""`MixedStreamingDataModule`: prepared token sources mixed by weight, with exact resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from tinyrecipe.data.mixture import (
    MixedBlockStream,
    MixtureSchedule,
    SequentialBlocks,
    ShardedEvalSampler,
    TokenBlocks,
    check_split,
)


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


class MixedStreamingDataModule(L.LightningDataModule):
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
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("data.sources is empty; list at least one prepared source")
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
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
        self.shuffle_window_chunks = shuffle_window_chunks
        self.batches_consumed = 0
        self._train: list[TokenBlocks] | None = None
        self._val: list[TokenBlocks] = []

    # -- setup ---------------------------------------------------------------------------------

    def val_sources(self) -> list[tuple[str, float]]:
        """(name, weight) of each validation loader, for the module's val/loss/<name> logs."""
        return [(s.name, s.weight) for s in self.sources if s.validation]

    def prepare_data(self) -> None:
        """Refuse a missing or damaged local split before the run starts (and writes logs)."""
        for s in self.sources:
            for split in (s.train, s.validation):
                if split:
                    check_split(split, s.prepare)

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
            )
            for n, s in enumerate(self.sources)
        ]
        self._val = [
            TokenBlocks(s.validation, self.block_size, prepare=s.prepare)
            for s in self.sources
            if s.validation
        ]
        self._check_metadata()
        self.schedule = MixtureSchedule([s.weight for s in self.sources], seed=self.seed)

    def _check_metadata(self) -> None:
        expected_sha = None
        if self.tokenizer_dir is not None:
            from tinyrecipe.data.tokenizer import TextTokenizer

            expected_sha = TextTokenizer(self.tokenizer_dir).sha256
        first_sha = None
        for blocks in self._train + self._val:
            meta = blocks.meta
            if not meta:
                raise ValueError(
                    f"data dir '{blocks.path}' has no tinyrecipe metadata in index.json; "
                    "prepare it with data_prep/prepare_*.py"
                )
            if self.vocab_size is not None and meta["vocab_size"] != self.vocab_size:
                raise ValueError(
                    f"data dir '{blocks.path}' has tokenizer vocab {meta['vocab_size']}, model expects "
                    f"{self.vocab_size} — re-run data_prep with the model's tokenizer or set "
                    "model vocab_size"
                )
            sha = meta["tokenizer_sha256"]
            if expected_sha is not None and sha != expected_sha:
                raise ValueError(
                    f"data dir '{blocks.path}' was tokenized with another tokenizer than "
                    f"'{self.tokenizer_dir}' — re-run data_prep with that tokenizer"
                )
            if first_sha is not None and sha != first_sha:
                raise ValueError(
                    f"data dir '{blocks.path}' was tokenized with another tokenizer than "
                    f"'{self._train[0].path}'; all sources must share one tokenizer"
                )
            first_sha = sha

    # -- loaders -------------------------------------------------------------------------------

    def set_rank_world(self, rank: int, world_size: int) -> None:
        """Which share of the stream this process trains on, without a Trainer (Fabric)."""
        self._rank_world_override = (rank, world_size)

    def _rank_world(self) -> tuple[int, int]:
        if getattr(self, "_rank_world_override", None):
            return self._rank_world_override
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_world()
        stream = MixedBlockStream(
            self._train, self.schedule, self.batch_size, self.batches_consumed, rank, world
        )
        return _CountingLoader(
            self, stream, batch_size=self.batch_size, num_workers=self.num_workers
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per source with validation data; batches are dicts (input_ids, labels).
        Ranks split the blocks without repeating any, and all run the same number of batches."""
        self.setup()
        rank, world = self._rank_world()
        loaders = []
        for blocks in self._val:
            dataset = SequentialBlocks(blocks, self.val_max_blocks)
            loaders.append(
                DataLoader(
                    dataset,
                    batch_size=self.val_batch_size,
                    sampler=ShardedEvalSampler(dataset, rank, world),
                    num_workers=self.num_workers,
                )
            )
        return loaders

    # -- resume --------------------------------------------------------------------------------

    def _batches_done(self) -> int:
        """Micro-batches trained on. Under a fitting Trainer its progress counter is the truth:
        the loader itself runs a batch ahead (Lightning prefetches one to spot the last)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer, "training", False):
            return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        return self.batches_consumed

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_consumed": self._batches_done(),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "seed": self.seed,
            "weights": [s.weight for s in self.sources],
            "world_size": self._rank_world()[1],
            "shuffle_window_chunks": self.shuffle_window_chunks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        state = {"shuffle_window_chunks": 1, **state}  # written before windows: one chunk each
        for key in (
            "batch_size",
            "block_size",
            "seed",
            "weights",
            "world_size",
            "shuffle_window_chunks",
        ):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data state in the checkpoint has {key}={state.get(key)!r} but this run has "
                    f"{mine[key]!r}; resume with the same data settings (or start a new run)"
                )
        self.batches_consumed = int(state["batches_consumed"])


class _CountingLoader(DataLoader):
    """A DataLoader that tells its DataModule how many batches were handed out."""

    def __init__(self, datamodule: MixedStreamingDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    def __iter__(self):
        for batch in super().__iter__():
            self._datamodule.batches_consumed += 1
            yield batch

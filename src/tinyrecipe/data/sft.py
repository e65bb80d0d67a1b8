"""Supervised fine-tuning data: instruction records -> token ids with the loss on responses only.

Records (JSON lines, or Python dicts in a notebook) take one of four forms:

    {"prompt": "What is 2 + 2?", "response": "4"}
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 2?"},
                  {"role": "assistant", "content": "4"}]}
    {"instruction": "Add the numbers.", "input": "2 + 2", "output": "4"}      (Alpaca)
    {"conversations": [{"from": "human", "value": "What is 2 + 2?"},
                       {"from": "gpt", "value": "4"}]}                      (ShareGPT)

and are rendered with one plain template (a prompt/response record is a user turn then an
assistant turn; an Alpaca record's prompt is its instruction, then a blank line and its input
when there is one; ShareGPT's human/gpt/system are user/assistant/system):

    <s>### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}</s>### User:\\n...

Only the assistant texts and their closing `</s>` are trained on; every other position has
label -100. Each piece is tokenized on its own, so the tokens the model is trained to continue
from equal `format_prompt(...)` tokenized as one string at generation time.

Bad records (malformed JSON, a missing or non-string field, an unknown role, no assistant turn,
an empty response, a prompt so long that no response token fits) are counted by reason and
skipped; the counts are reported once, with the file name.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tinyrecipe.data.mixture import ShardedEvalSampler
from tinyrecipe.data.position import CountingLoader, StreamPosition, micro_batch_samples
from tinyrecipe.data.prep import in_validation
from tinyrecipe.model.loss import IGNORE_INDEX

HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
# ShareGPT's speakers; any other is kept as it is (and refused as an unknown role)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class BadRecord(ValueError):
    """A record the template cannot render; the message is the reason counted."""


def _messages(record: Any) -> list[dict]:
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("messages is not a non-empty list")
        return messages
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise BadRecord("conversations is not a non-empty list")
        if not all(isinstance(t, dict) for t in turns):
            raise BadRecord("a conversation turn that is not an object")
        return [
            {"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
            for t in turns
        ]
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise BadRecord(f"missing or non-string {key}")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord("non-string input")
        prompt = record["instruction"] + ("\n\n" + extra if extra else "")
        record = {"prompt": prompt, "response": record["output"]}
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise BadRecord(f"missing or non-string {key}")
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    raise BadRecord("none of prompt/response, messages, instruction/output or conversations")


def render(record: Any) -> list[tuple[str, bool]]:
    """The record as (text, trained) pieces, in order; raises BadRecord."""
    pieces: list[tuple[str, bool]] = []
    pending = ""  # untrained text waiting to be emitted as one piece
    trained_any = False
    for m in _messages(record):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRecord("a message without string content")
        role = m.get("role")
        if role not in HEADERS:
            raise BadRecord(f"unknown role {role!r}")
        if role == "assistant":
            if not m["content"].strip():
                raise BadRecord("empty response")
            pieces.append((pending + HEADERS["assistant"], False))
            pieces.append((m["content"], True))
            pending, trained_any = "", True
        else:
            pending += HEADERS[role] + m["content"] + "\n\n"
    if not trained_any:
        raise BadRecord("no assistant turn")
    return pieces


def format_prompt(prompt: str, system: str | None = None) -> str:
    """The text a fine-tuned model continues to answer `prompt` (without the leading <s>)."""
    head = HEADERS["system"] + system + "\n\n" if system else ""
    return head + HEADERS["user"] + prompt + "\n\n" + HEADERS["assistant"]


def encode(record: Any, tokenizer, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels), each at most `max_tokens` long: labels are the next token where it
    is trained, -100 elsewhere. Raises BadRecord."""
    ids, trained = [tokenizer.bos_id], [False]
    for text, is_trained in render(record):
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_trained] * len(piece)
        if is_trained:  # each response ends with </s>, trained too
            ids.append(tokenizer.eos_id)
            trained.append(True)
    ids, trained = ids[: max_tokens + 1], trained[: max_tokens + 1]
    labels = [t if ok else IGNORE_INDEX for t, ok in zip(ids[1:], trained[1:], strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRecord("prompt fills the context; no response token fits")
    return ids[:-1], labels


def read_jsonl(path: str | Path, skipped: Counter) -> Iterator[Any]:
    """Records of a JSON-lines file; malformed lines are counted in `skipped` and left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file '{path}' does not exist; pass a .jsonl file")
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["non-UTF-8 line"] += 1
            except json.JSONDecodeError:
                skipped["malformed JSON"] += 1


def is_validation(record: Any, fraction: float) -> bool:
    """The record's side of the content-keyed split (`tinyrecipe.data.prep.in_validation`)."""
    return in_validation(json.dumps(record, sort_keys=True, ensure_ascii=False), fraction * 1000)


def tokenize_records(
    records: Iterable[Any], tokenizer, max_tokens: int, skipped: Counter
) -> list[tuple[list[int], list[int]]]:
    out = []
    for record in records:
        try:
            out.append(encode(record, tokenizer, max_tokens))
        except BadRecord as reason:
            skipped[str(reason)] += 1
    return out


def pack(examples: list[tuple[list[int], list[int]]], block_size: int) -> list[tuple[list, list]]:
    """Concatenate examples and cut into full blocks of `block_size` (the tail is dropped)."""
    ids = [t for x, _ in examples for t in x]
    labels = [t for _, y in examples for t in y]
    return [
        (ids[i : i + block_size], labels[i : i + block_size])
        for i in range(0, len(ids) - block_size + 1, block_size)
    ]


def pack_whole(
    examples: list[tuple[list[int], list[int]]], block_size: int
) -> list[tuple[list, list, list]]:
    """Examples placed whole, in order, into rows of at most `block_size` tokens (a row is
    closed when the next example does not fit), each token tagged with its example's index in
    the row: (ids, labels, documents) for attention within each example (`document_mask`)."""
    rows: list[tuple[list, list, list]] = []
    for ids, labels in examples:
        if not rows or len(rows[-1][0]) + len(ids) > block_size:
            rows.append(([], [], []))
        row_ids, row_labels, documents = rows[-1]
        document = documents[-1] + 1 if documents else 0
        row_ids += ids
        row_labels += labels
        documents += [document] * len(ids)
    return rows


def collate(examples: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad ids are `pad_id`, pad labels -100. Examples with
    document ids (`pack_whole`) add `documents`, the padding a document of its own."""
    width = max(len(x[0]) for x in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y, *_) in enumerate(examples):
        input_ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    batch = {"input_ids": input_ids, "labels": labels}
    if len(examples[0]) == 3:
        documents = torch.empty((len(examples), width), dtype=torch.long)
        for row, (x, _, docs) in enumerate(examples):
            documents[row, : len(x)] = torch.tensor(docs)
            documents[row, len(x) :] = docs[-1] + 1
        batch["documents"] = documents
    return batch


def epoch_rows(rows: int, global_batch: int) -> int:
    """The rows an SFT epoch trains on: the whole global batches `rows` fill."""
    return rows - rows % global_batch


class PaddedExamples(Dataset):
    """Validation examples; index `len(self)` and beyond is a padding example without targets,
    with which `ShardedEvalSampler` evens the ranks' shares (each real example counted once, so
    the loss does not depend on the number of ranks)."""

    def __init__(self, examples: list[tuple], pad_id: int) -> None:
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, j: int) -> tuple:
        if j < len(self.examples):
            return self.examples[j]
        pad = ([self.pad_id], [IGNORE_INDEX])
        return (*pad, [0]) if len(self.examples[0]) == 3 else pad


class SFTStream(IterableDataset):
    """The training rows in a seeded order, new each epoch: global sample i is row
    `order(e)[i mod n]` of epoch e = i // n, n being the rows that whole global batches hold (the
    rest of each epoch's order is left out, as with drop_last, and differs from epoch to epoch;
    n depends on the global batch alone, so an epoch is the same rows on any split of it into
    processes, micro-batches and accumulation, and ends on an optimizer step). Micro-batches are
    split across processes and loader workers as in the pretraining stream
    (`tinyrecipe.data.position`); an iteration runs from `start_batch` to the end of that epoch,
    so a run resumes mid-epoch exactly."""

    def __init__(
        self,
        rows: list,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        accumulate: int = 1,
    ):
        self.rows, self.seed, self.batch_size = rows, seed, batch_size
        self.rank, self.world_size = rank, world_size
        per_batch = batch_size * world_size  # rows of one micro-batch of every process
        # micro-batches of each rank an epoch
        self.per_epoch = epoch_rows(len(rows), per_batch * accumulate) // per_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"SFT data has {len(rows)} training rows, fewer than one global batch "
                f"({batch_size} x {world_size} processes x {accumulate} accumulated); lower "
                "data.batch_size or add records"
            )
        self.start_batch = 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:  # rows this process takes in an epoch
        return self.per_epoch * self.batch_size

    def row(self, i: int):
        epoch, position = divmod(i, self.per_epoch * self.batch_size * self.world_size)
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)),
            )
        return self.rows[self._order[1][position]]

    def __iter__(self):
        stop = (self.start_batch // self.per_epoch + 1) * self.per_epoch
        for i in micro_batch_samples(
            self.start_batch, self.batch_size, self.rank, self.world_size, stop
        ):
            yield self.row(i)


class SFTDataModule(StreamPosition, L.LightningDataModule):
    """Instruction data for fine-tuning, from a JSON-lines file or a list of records.

    Batches are dicts: `input_ids` and `labels` (B, T), labels -100 where no loss is taken.
    Without `packing` each example is one row, right-padded to the longest in the batch; with
    it, examples are concatenated and cut into rows of exactly `block_size` tokens. With
    `packing` and `document_mask`, examples are placed whole into rows of up to `block_size`
    tokens (right-padded) and batches add `documents` (B, T): each token attends only within
    its own example, as if each were alone (`model.config.document_positions: restart` also
    restarts its positions).
    Validation: `val_file`, or else a stable `val_fraction` of the training records.
    Training rows come in a seeded order, new each epoch (`SFTStream`); `state_dict()` is the
    position in samples, so a run resumes mid-epoch exactly, also on another number of
    processes or micro-batch size (same global batch, unless `allow_global_batch_change`).

    Args:
        train_file / records: the training records (one of the two).
        tokenizer_dir: the model's tokenizer (tokenizer.json or tokenizer.model).
        vocab_size: the model's (linked by the CLI); the tokenizer must fit in it.
    """

    targets_vary = True  # prompts and padding take no loss: steps normalise per target token

    def __init__(
        self,
        train_file: str | None = None,
        records: list[dict] | None = None,
        tokenizer_dir: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        block_size: int = 2048,
        batch_size: int = 8,
        packing: bool = False,
        document_mask: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        vocab_size: int | None = None,
        allow_global_batch_change: bool = False,
    ) -> None:
        super().__init__()
        if (train_file is None) == (records is None):
            raise ValueError("SFT data: give exactly one of data.train_file or data.records")
        if tokenizer_dir is None:
            raise ValueError("SFT data: set data.tokenizer_dir to the model's tokenizer directory")
        if document_mask and not packing:
            raise ValueError(
                "data.document_mask needs data.packing: true (unpacked rows hold one example)"
            )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        self.train_file, self.records, self.tokenizer_dir = train_file, records, tokenizer_dir
        self.val_file, self.val_fraction = val_file, val_fraction
        self.block_size, self.batch_size, self.packing = block_size, batch_size, packing
        self.document_mask = document_mask
        self.num_workers, self.seed, self.vocab_size = num_workers, seed, vocab_size
        self.allow_global_batch_change = allow_global_batch_change
        self.batches_consumed = 0
        self.skipped: Counter = Counter()
        self.train_examples: list = []
        self.val_examples: list = []

    def val_sources(self) -> list[tuple[str, float]]:
        """(name, weight) of each validation loader, for the module's val/loss/<name> logs."""
        return [("sft", 1.0)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        from tinyrecipe.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_dir)
        if self.vocab_size is not None and tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"tokenizer '{self.tokenizer_dir}' has {tokenizer.vocab_size} tokens but the model "
                f"only {self.vocab_size}; use the tokenizer the model was trained with"
            )
        self.pad_id = tokenizer.eos_id
        source = self.train_file or "data.records"
        records = list(
            read_jsonl(self.train_file, self.skipped) if self.train_file else self.records
        )
        if self.val_file:
            train, val = records, list(read_jsonl(self.val_file, self.skipped))
        else:
            val = [r for r in records if is_validation(r, self.val_fraction)]
            train = [r for r in records if not is_validation(r, self.val_fraction)]
        self.train_examples = tokenize_records(train, tokenizer, self.block_size, self.skipped)
        self.val_examples = tokenize_records(val, tokenizer, self.block_size, self.skipped)
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            rank_zero_warn(
                f"SFT data {source}: skipped {sum(self.skipped.values())} record(s): {reasons}"
            )
        if self.packing:
            packer = pack_whole if self.document_mask else pack
            self.train_examples = packer(self.train_examples, self.block_size)
            self.val_examples = packer(self.val_examples, self.block_size)
        if not self.train_examples:
            raise ValueError(
                f"SFT data {source}: no usable training example (skipped: {dict(self.skipped)}); "
                "check the record format in the tinyrecipe.data.sft docs"
            )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_world()
        stream = SFTStream(
            self.train_examples, self.seed, self.batch_size, rank, world, self.accumulation()
        )
        return CountingLoader(
            self,
            stream,
            batch_size=self.batch_size,
            collate_fn=functools.partial(collate, pad_id=self.pad_id),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            return []
        rank, world = self._rank_world()
        dataset = PaddedExamples(self.val_examples, self.pad_id)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=ShardedEvalSampler(dataset, rank, world),
            collate_fn=functools.partial(collate, pad_id=self.pad_id),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.position_state(),
            "seed": self.seed,
            "block_size": self.block_size,
            "rows": len(self.train_examples),
            "epoch_rows": epoch_rows(len(self.train_examples), self.global_batch()),
            "packing": self.packing,
            "document_mask": self.document_mask,
        }

    def resume_position(self, state: dict[str, Any]) -> int:
        """The micro-batches of this run a checkpoint's data state stands for, after checking
        that the rows and their order are the same; each refusal is one line naming the key."""
        self.setup()
        mine = self.state_dict()
        for key in ("seed", "block_size", "rows", "packing", "document_mask"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"SFT data state in the checkpoint has {key}={state.get(key)!r} but this run "
                    f"has {mine[key]!r}; resume with the same data (or start a new run)"
                )
        theirs = state.get("epoch_rows")
        if theirs is None:  # older checkpoints: epochs of whole micro-batches of every process
            theirs = epoch_rows(state["rows"], state["batch_size"] * state["world_size"])
        if theirs != mine["epoch_rows"]:
            raise ValueError(
                f"the checkpoint's SFT epochs hold {theirs} rows, this run's "
                f"{mine['epoch_rows']} (whole global batches of {self.global_batch()}); resume "
                "with the checkpoint's global batch (or start a new run)"
            )
        return self.position_of(state)

"""The data path end to end on the offline sample corpus: make_sample -> train_tokenizer ->
prepare_* -> MixedStreamingDataModule, plus bad input, determinism and exact resume."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from tinyrecipe.data import DataSource, MixedStreamingDataModule, load_tokenizer
from tinyrecipe.data.mixture import MixtureSchedule, SequentialBlocks, TokenBlocks
from tinyrecipe.data.prep import prepare_split, read_metadata, split_documents
from tinyrecipe.data.readers import SLIMPAJAMA, STARCODER, read_records

from .conftest import script


def datamodule(
    corpus, validation: bool = True, reverse: bool = False, **kwargs
) -> MixedStreamingDataModule:
    root = corpus["root"]
    val = {s: str(root / s / "validation") if validation else None for s in ("slim", "star")}
    sources = [
        DataSource("slimpajama", str(root / "slim/train"), val["slim"], 0.7),
        DataSource("starcoderdata", str(root / "star/train"), val["star"], 0.3),
    ][:: -1 if reverse else 1]
    options = dict(block_size=64, batch_size=4, vocab_size=1024, tokenizer_dir=str(root / "tok"))
    options.update(kwargs)
    dm = MixedStreamingDataModule(sources, **options)
    dm.setup()
    return dm


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_pipeline_yields_batches_of_token_blocks(corpus):
    dm = datamodule(corpus)
    batch = take(dm.train_dataloader(), 1)[0]
    inputs, labels = batch["input_ids"], batch["labels"]
    assert inputs.shape == labels.shape == (4, 64) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # the labels are the next tokens
    assert 0 <= inputs.min() and inputs.max() < 1024
    val = dm.val_dataloader()
    assert len(val) == 2 and all(len(v) > 0 for v in val)
    meta = read_metadata(corpus["root"] / "slim/train")
    assert (
        meta["vocab_size"] == 1024 and meta["dtype"] == "uint16" and meta["boundary"] == "bos_eos"
    )
    assert meta["tokenizer_sha256"] == load_tokenizer(corpus["root"] / "tok").sha256


def test_github_records_are_dropped_and_counted(corpus):
    root = corpus["root"]
    tok = load_tokenizer(root / "tok")
    for split in ("train", "validation"):
        records = [
            json.loads(line)
            for f in sorted((root / "raw/slimpajama" / split).rglob("*.jsonl.zst"))
            for line in zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read().splitlines()
        ]
        github = [r for r in records if r["meta"]["redpajama_set_name"] == "RedPajamaGithub"]
        kept = [r["text"] for r in records if r not in github]
        meta = read_metadata(root / "slim" / split)
        assert meta["skipped"].get("dropped_RedPajamaGithub", 0) == len(github)
        assert meta["documents"] == len(kept)
        # exactly the non-GitHub documents' tokens (plus BOS/EOS each) were written
        assert meta["tokens"] == sum(len(ids) + 2 for ids in tok.encode_batch(kept))
    assert "dropped_RedPajamaGithub" in corpus["slim_out"]


def test_blocks_are_the_document_stream_with_boundaries(corpus, tmp_path):
    root = corpus["root"]
    tok = load_tokenizer(root / "tok")
    docs = [
        t
        for t, r in read_records(
            next((root / "raw/slimpajama/validation").rglob("*.zst")), SLIMPAJAMA
        )
        if r is None
    ]
    for boundary, (bos, eos) in {"bos_eos": (1, 1), "bos": (1, 0)}.items():
        prepare_split(
            "v",
            [next((root / "raw/slimpajama/validation").rglob("*.zst"))],
            tmp_path / boundary,
            root / "tok",
            SLIMPAJAMA,
            boundary=boundary,
            num_workers=1,
            chunk_tokens=10**7,
        )
        stream = []
        for text in docs:
            stream += [tok.bos_id] * bos + tok.encode(text) + [tok.eos_id] * eos
        blocks = TokenBlocks(str(tmp_path / boundary / "v"), 64)
        assert (
            len(blocks) == len(stream) // 65
        )  # one chunk: the tail shorter than a block is unused
        for j in (0, 1, len(blocks) - 1):
            assert blocks.block(j).tolist() == stream[j * 65 : (j + 1) * 65]
        assert (tok.eos_id in stream) == bool(eos)


def test_prep_output_is_identical_for_any_worker_count_and_reruns_skip(corpus, tmp_path):
    root = corpus["root"]
    files = sorted((root / "raw/starcoderdata").rglob("*.parquet"))
    for workers in (1, 2):
        s = prepare_split(
            "train",
            files,
            tmp_path / f"w{workers}",
            root / "tok",
            STARCODER,
            num_workers=workers,
            chunk_tokens=8192,
            keep="train",
            val_permille=100,
        )
        assert not s.reused
    chunks = sorted(p.name for p in (tmp_path / "w1/train").iterdir())
    assert chunks == sorted(p.name for p in (tmp_path / "w2/train").iterdir())
    for name in chunks:
        a, b = ((tmp_path / w / "train" / name).read_bytes() for w in ("w1", "w2"))
        if name == "index.json":  # identical but for litdata's write timestamp
            a, b = (json.loads(x) for x in (a, b))
            a.pop("updated_at"), b.pop("updated_at")
        assert a == b, name
    (tmp_path / "w1/.train.tmp-99999").mkdir()  # debris of an interrupted run
    again = prepare_split(
        "train",
        files,
        tmp_path / "w1",
        root / "tok",
        STARCODER,
        num_workers=1,
        chunk_tokens=8192,
        keep="train",
        val_permille=100,
    )
    assert again.reused and again.documents == s.documents
    assert not (tmp_path / "w1/.train.tmp-99999").exists()


def test_prep_reuses_a_split_only_for_the_same_files(corpus, tmp_path):
    tok = corpus["root"] / "tok"
    a, b = tmp_path / "a/doc.txt", tmp_path / "b/doc.txt"
    for path, word in ((a, "alpha"), (b, "gamma")):  # same name, same size, other text
        path.parent.mkdir()
        path.write_text(f"{word} beta delta\n")

    def prep(path):
        s = prepare_split("train", [path], tmp_path / "out", tok, num_workers=1)
        return s.reused, next(split_documents(tmp_path / "out/train")).tolist()

    reused, first = prep(a)
    assert not reused and prep(a) == (True, first)
    reused, other = prep(b)  # another directory's file of the same name and size
    assert not reused and other != first
    b.write_text("gamma beta omega\n")  # edited in place, same size
    reused, edited = prep(b)
    assert not reused and edited != other


def write_zst(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return path


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = json.dumps(
        {"text": "a fine document", "meta": {"redpajama_set_name": "RedPajamaC4"}}
    ).encode()
    lines = [
        good,
        b"{not json",
        json.dumps({"meta": {}}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "caf\xe9"}',
        json.dumps({"text": 5}).encode(),
        good,
        json.dumps({"text": "code", "meta": {"redpajama_set_name": "RedPajamaGithub"}}).encode(),
    ]
    path = write_zst(tmp_path / "a.jsonl.zst", lines)
    counts = Counter(reason for _, reason in read_records(path, SLIMPAJAMA))
    assert counts == {
        None: 2,
        "malformed_json": 1,
        "missing_text": 2,
        "empty": 1,
        "non_utf8": 1,
        "dropped_RedPajamaGithub": 1,
    }
    data = path.read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[: len(data) - 5])
    assert Counter(r for _, r in read_records(cut, SLIMPAJAMA))["truncated_file"] == 1
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "no_content.parquet")
    assert [r for _, r in read_records(tmp_path / "no_content.parquet", STARCODER)] == [
        "missing_content_column"
    ]
    pq.write_table(pa.table({"content": ["def f(): pass", None, "  "]}), tmp_path / "c.parquet")
    assert Counter(r for _, r in read_records(tmp_path / "c.parquet", STARCODER)) == {
        None: 1,
        "missing_content": 1,
        "empty": 1,
    }


def test_script_errors_are_one_line(corpus, tmp_path):
    result = script(
        "prepare_slimpajama.py",
        "--input",
        tmp_path / "nope",
        "--tokenizer",
        corpus["root"] / "tok",
        "--out",
        tmp_path / "o",
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: input directory '{tmp_path / 'nope'}' does not exist; pass the SlimPajama root"
    ]
    (tmp_path / "empty/train").mkdir(parents=True)
    result = script(
        "prepare_slimpajama.py",
        "--input",
        tmp_path / "empty",
        "--tokenizer",
        corpus["root"] / "tok",
        "--out",
        tmp_path / "o",
        check=False,
    )
    assert result.returncode == 2 and "holds no readable file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o/train").exists()


def test_mixture_ratio_within_two_percent(corpus):
    dm = datamodule(corpus, batch_size=8)
    sources = Counter(dm.schedule.locate(i)[0] for i in range(2048))
    assert abs(sources[0] / 2048 - 0.7) < 0.02 and abs(sources[1] / 2048 - 0.3) < 0.02
    # and the blocks actually served come from those sources
    from tinyrecipe.data.mixture import MixedBlockStream

    stream = MixedBlockStream(dm._train, dm.schedule, 8)
    served = Counter(stream.sample(i)[0] for i in range(2000))
    assert abs(served[0] / 2000 - 0.7) < 0.02


def test_schedule_apportions_exactly():
    schedule = MixtureSchedule([0.7, 0.3], seed=1, period=1000)
    assert schedule.counts.tolist() == [700, 300]
    draws = [schedule.locate(i) for i in range(3000)]
    for s in (0, 1):  # the k-th draw of each source appears exactly once, in order
        ks = [k for src, k in draws if src == s]
        assert ks == list(range(len(ks)))


def test_each_epoch_is_a_permutation(corpus):
    blocks = TokenBlocks(str(corpus["root"] / "star/train"), 64, seed=3)
    n = len(blocks)
    first = [tuple(blocks.draw(k)) for k in range(n)]
    second = [tuple(blocks.draw(k)) for k in range(n, 2 * n)]
    all_blocks = sorted(tuple(blocks.block(j)) for j in range(n))
    assert sorted(first) == all_blocks == sorted(second) and first != second


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_is_exact_across_an_epoch_boundary(corpus, workers):
    # Large blocks make the sources small, so 60 batches of 16 cross epoch boundaries.
    opts = dict(block_size=512, batch_size=16, num_workers=workers, validation=False)
    reference = datamodule(corpus, **opts)
    sizes = [len(b) for b in reference._train]
    full = take(reference.train_dataloader(), 60)
    draws = Counter(reference.schedule.locate(i)[0] for i in range(60 * 16))
    assert any(draws[s] > sizes[s] for s in range(2)), (
        draws,
        sizes,
    )  # an epoch boundary is crossed

    first = datamodule(corpus, **opts)
    head = take(first.train_dataloader(), 25)
    state = first.state_dict()
    assert state["batches_consumed"] == 25
    resumed = datamodule(corpus, **opts)
    resumed.load_state_dict(state)
    tail = take(resumed.train_dataloader(), 35)
    for got, want in zip(head + tail, full, strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels"], want["labels"])


@pytest.mark.fast
def test_validation_blocks_are_spread_over_the_whole_split():
    """val_max_blocks takes runs of consecutive blocks from every part of a split (Starcoderdata's
    validation is written language after language), never a block twice."""

    class Split:  # only its length matters for which blocks are picked
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    for total, limit in ((941, 128), (1_000_000, 6400), (300, 65), (10, 10), (10, None)):
        val = SequentialBlocks(Split(total), limit)
        picked = [val.index(j) for j in range(len(val))]
        assert len(picked) == min(limit or total, total) and picked == sorted(set(picked))
        starts = picked[:: val.run]
        assert len(starts) <= SequentialBlocks.RUNS and starts[0] == 0 and picked[-1] < total
        assert total - starts[-1] <= total // len(starts) + val.run  # the last run near the end


def test_resume_refuses_other_data_settings(corpus):
    state = {**datamodule(corpus).state_dict(), "samples_consumed": 120}  # both sources drew
    for changed, message in (
        (dict(batch_size=8), "global batch of 4 sequences, this run has 8; keep it"),
        (dict(seed=5), "seed=42 but this run has 5"),
        (dict(block_size=32), "block_size=64 but this run has 32"),
        (dict(reverse=True), r"keep \['slimpajama', 'starcoderdata'\] first and in that order"),
    ):
        with pytest.raises(ValueError, match=message):
            datamodule(corpus, **changed).load_state_dict(state)


def global_sequence(dm, rank_world_accumulate, steps):
    """The rows each optimizer step trains on, in global sample order: micro-batch a of rank r
    holds samples ((step x A + a) x W + r) x B ...; read back from every rank's loader."""
    _, world, accumulate = rank_world_accumulate
    loaders = []
    for rank in range(world):
        dm.set_rank_world(rank, world, accumulate)
        loaders.append(iter(dm.train_dataloader()))
    rows = []
    for _ in range(steps):
        for _ in range(accumulate):
            for loader in loaders:
                rows.extend(next(loader)["input_ids"])
    dm.batches_consumed = dm.batches_consumed // world  # each rank's loader counted its own
    dm.set_rank_world(0, world, accumulate)
    return rows


@pytest.mark.parametrize(
    ("before", "after"),
    [((2, 2, 2), (4, 1, 2)), ((4, 1, 2), (2, 2, 2)), ((1, 2, 4), (8, 1, 1))],
    ids=["2-ranks-to-1", "1-rank-to-2", "micro-batch-and-accumulation"],
)
def test_elastic_resume_continues_the_global_sample_sequence(corpus, before, after):
    """(micro-batch, ranks, accumulation) changes at a checkpoint with the global batch (8) kept:
    the samples after it are the ones an unchanged run would have drawn, none repeated or
    skipped (compared by sample through the stream's own index -> block function)."""
    opts = dict(block_size=64, validation=False)
    first = datamodule(corpus, batch_size=before[0], **opts)
    head = global_sequence(first, (0, before[1], before[2]), 3)
    state = first.state_dict()
    assert state["samples_consumed"] == 24 and state["global_batch"] == 8
    resumed = datamodule(corpus, batch_size=after[0], **opts)
    resumed.set_rank_world(0, after[1], after[2])
    resumed.load_state_dict(state)
    tail = global_sequence(resumed, (0, after[1], after[2]), 2)
    stream = resumed.train_dataloader().dataset
    for i, row in enumerate(head + tail):
        assert torch.equal(row, stream.sample(i)[1][:-1]), i


def test_another_global_batch_only_when_allowed_and_then_exact(corpus):
    opts = dict(block_size=64, validation=False)
    first = datamodule(corpus, batch_size=4, **opts)
    take(first.train_dataloader(), 6)  # 24 samples
    state = first.state_dict()
    with pytest.raises(ValueError, match="data.allow_global_batch_change: true"):
        datamodule(corpus, batch_size=8, **opts).load_state_dict(state)
    bigger = datamodule(corpus, batch_size=8, allow_global_batch_change=True, **opts)
    bigger.load_state_dict(state)
    assert bigger.batches_consumed == 3  # sample 24 onwards
    stream = bigger.train_dataloader().dataset
    batch = take(bigger.train_dataloader(), 1)[0]["input_ids"]
    assert all(torch.equal(batch[j], stream.sample(24 + j)[1][:-1]) for j in range(8))
    odd = datamodule(corpus, batch_size=16, allow_global_batch_change=True, **opts)
    with pytest.raises(ValueError, match="not a multiple of this run's 16 per micro-batch"):
        odd.load_state_dict(state)
    partial = datamodule(corpus, batch_size=4, allow_global_batch_change=True, **opts)
    partial.set_rank_world(0, 1, 4)  # a global batch of 16: sample 24 is half-way into one
    with pytest.raises(ValueError, match="not a whole number of this run's global batches of 16"):
        partial.load_state_dict(state)


@pytest.mark.fast
def test_staged_mixture_follows_its_schedule_in_every_window():
    """Source 2 enters at sample 20,000 with a ramp over 30,000 samples, source 0 leaves at
    80,000: in every window of 1,024 samples (the mixing period, counted from the start of each
    constant or ramping stretch) each source's share is within 1% of the schedule's mean weight
    over the window, and every source's draws are counted 0, 1, 2, ..."""
    phases = [
        (0, [0.7, 0.3, 0.0], 0),
        (20_000, [0.5, 0.2, 0.3], 30_000),
        (80_000, [0.0, 0.4, 0.6], 0),
    ]
    schedule = MixtureSchedule(seed=11, period=1024, phases=phases)
    n, window = 100_000, 1024
    draws = [schedule.locate(i) for i in range(n)]
    for s in range(3):
        ks = [k for src, k in draws if src == s]
        assert ks == list(range(len(ks)))
    sources = np.array([src for src, _ in draws])
    worst, starts = 0.0, [0, 20_000, 50_000, 80_000, n]
    # the windows: the mixing periods, counted from where each constant or ramping stretch starts
    windows = [
        a
        for lo, hi in zip(starts, starts[1:], strict=False)
        for a in range(lo, hi - window + 1, window)
    ]
    for a in windows:
        want = np.mean([schedule.weights_at(i) for i in range(a, a + window, 16)], axis=0)
        got = np.bincount(sources[a : a + window], minlength=3) / window
        worst = max(worst, np.abs(got - want).max())
    assert worst < 0.01, worst
    assert (sources[:20_000] != 2).all() and (sources[80_000:] != 0).all()
    # a stage added later leaves every sample before it as it was
    shorter = MixtureSchedule(seed=11, period=1024, phases=phases[:2])
    assert [shorter.locate(i) for i in range(0, 80_000, 37)] == draws[:80_000:37]
    single = MixtureSchedule([0.7, 0.3, 0.0], seed=11, period=1024)
    assert [single.locate(i) for i in range(0, 20_000, 37)] == draws[:20_000:37]


def test_stages_in_the_datamodule_and_their_one_line_errors(corpus):
    stage = {"start_tokens": 64 * 100, "weights": {"starcoderdata": 1.0}, "ramp_tokens": 64 * 50}
    dm = datamodule(corpus, stages=[stage], mixing_period=16)
    assert dm.phases() == [(0, [0.7, 0.3], 0), (100, [0.0, 1.0], 50)]
    assert dm.schedule.locate(200)[0] == 1 and dm.val_sources()[0] == ("slimpajama", 0.7)
    by_step = datamodule(corpus, stages=[{"start_step": 25, "weights": {"slimpajama": 1}}])
    assert by_step.phases()[1][0] == 100  # 25 steps of 4 sequences

    def adds(name):  # a later stage bringing a new source
        new = {"name": name, "train": str(corpus["root"] / "slim/train")}
        return {"start_tokens": 64 * 500, "weights": {name: 1.0}, "sources": [new]}

    early = datamodule(corpus, stages=[adds("x")]).state_dict()  # before the stage: x never drew
    datamodule(corpus, stages=[adds("y")]).load_state_dict(early)
    cut = [stage, {"start_tokens": 64 * 120, "weights": {"slimpajama": 1}}]
    with pytest.raises(ValueError, match=r"stages\[1\] starts at sample 120, inside the ramp"):
        datamodule(corpus, stages=cut).phases()
    state = dm.state_dict()
    state["samples_consumed"] = 120
    moved = datamodule(corpus, stages=[{**stage, "start_tokens": 64 * 110}], mixing_period=16)
    with pytest.raises(ValueError, match="only stages that start later may be added or changed"):
        moved.load_state_dict(state)
    later = datamodule(
        corpus,
        stages=[stage, {"start_tokens": 64 * 500, "weights": {"slimpajama": 1}}],
        mixing_period=16,
    )
    later.load_state_dict(state)  # a stage after the position may be added
    for bad, message in (
        ({"weights": {"proofpile": 1.0}, "start_step": 5}, r"names \['proofpile'\], not a source"),
        ({"weights": {"slimpajama": 1.0}}, "exactly one of start_tokens or start_step"),
    ):
        with pytest.raises(ValueError, match=message):
            datamodule(corpus, stages=[bad])


def test_vocab_and_tokenizer_mismatch_are_refused(corpus, tmp_path):
    with pytest.raises(
        ValueError, match="has tokenizer vocab 1024, model expects 32000 — prepare it again"
    ):
        datamodule(corpus, vocab_size=32000)
    from tinyrecipe.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["some other text entirely"] * 10, 300, tmp_path / "tok2")
    with pytest.raises(ValueError, match="another tokenizer"):
        datamodule(corpus, tokenizer_dir=str(tmp_path / "tok2"))


def test_sentencepiece_tokenizer_model_directory_works(corpus, tmp_path):
    """A directory with a sentencepiece `tokenizer.model` (the Llama-2 format) loads and preps."""
    spm = pytest.importorskip("sentencepiece")
    from pydoc_data.topics import topics

    (tmp_path / "spm").mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(topics.values())[:200]),
        model_prefix=str(tmp_path / "spm/tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    tok = load_tokenizer(tmp_path / "spm")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, 1, 2)
    assert tok.decode(tok.encode("def main(): pass")) == "def main(): pass"
    _special_text_is_literal(tok)
    files = sorted((corpus["root"] / "raw/slimpajama/validation").rglob("*.zst"))
    summary = prepare_split(
        "v", files, tmp_path / "out", tmp_path / "spm", SLIMPAJAMA, num_workers=1
    )
    assert (
        summary.documents > 0
        and read_metadata(tmp_path / "out/v")["tokenizer_sha256"] == tok.sha256
    )


def _special_text_is_literal(tok):
    text = "if x <s> y: return '</s>'"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == text


def test_special_token_text_in_a_document_is_ordinary_characters(corpus):
    """`<s>`/`</s>` written in a document (HTML, code) never become BOS/EOS ids: the
    tokenizer.json path reads them as the sentencepiece tokenizer.model path does."""
    _special_text_is_literal(load_tokenizer(corpus["root"] / "tok"))


def test_missing_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)


def test_generated_text_keeps_the_space_after_the_prompt(corpus):
    """The Llama-style decoder strips a text's leading space; the continuation must not lose it."""
    from tinyrecipe.generation import continuation

    tok = load_tokenizer(corpus["root"] / "tok")
    prompt_ids, full = tok.encode("def"), tok.encode("def write(value)")
    assert full[: len(prompt_ids)] == prompt_ids
    new = full[len(prompt_ids) :]
    assert tok.decode(new) == "write(value)"  # what printing the new tokens alone gave
    assert continuation(tok, "def", prompt_ids, new) == "def write(value)"


@pytest.mark.fast
def test_a_shuffle_window_mixes_chunks_and_keeps_every_draw_a_function_of_its_index(tmp_path):
    """200 chunks of 8 blocks each: consecutive draws come from one chunk at a time without a
    window, from many with one; each epoch still draws every block exactly once; any order of k
    gives the same blocks (what makes resume exact for any worker count)."""
    from tinyrecipe.data.prep import markov_documents, write_synthetic_split

    docs = markov_documents(200 * 8 * 65, 512, doc_tokens=8 * 65, seed=3)
    write_synthetic_split(tmp_path / "split", docs, 512, chunk_tokens=8 * 65)
    distinct = {}
    for window in (1, 3, 128):
        blocks = TokenBlocks(str(tmp_path / "split"), 64, seed=5, window_chunks=window)
        assert len(blocks.blocks_per_chunk) == 200 and len(blocks) == 1600
        ends = blocks.chunk_start + blocks.blocks_per_chunk
        for epoch in (0, 1):
            drawn = [blocks.locate(k) for k in range(epoch * 1600, (epoch + 1) * 1600)]
            assert sorted(drawn) == list(range(1600)), window  # each block once per epoch
        chunks = [
            len({int((ends <= blocks.locate(k)).sum()) for k in range(b, b + 64)})
            for b in range(0, 1600, 64)
        ]
        distinct[window] = sum(chunks) / len(chunks)
        shuffled = np.random.default_rng(0).permutation(3200)
        fresh = TokenBlocks(str(tmp_path / "split"), 64, seed=5, window_chunks=window)
        assert [fresh.locate(int(k)) for k in shuffled] == [blocks.locate(int(k)) for k in shuffled]
    assert distinct[1] <= 9 and distinct[128] >= 48, distinct  # 64 draws: ~8 chunks vs ~55


def test_batch_diversity_counts_chunks_documents_and_languages(corpus, tmp_path):
    """Two languages of short code files, prepared into chunks of ~32 blocks: a batch of 16 draws
    comes from one or two chunks and mostly one language with the plain shuffle, as a TinyLlama
    batch does from its ~1,024-block chunks; with a window, from ~16 chunks and both languages."""
    from tinyrecipe.data.mixture import batch_diversity
    from tinyrecipe.data.prep import prepare_starcoder

    for lang, body in (
        ("python", "def f{i}(x):\n    return x * {i} + {i}\n"),
        ("c", "int f{i}(int x) {{ return x * {i}; }}\n"),
    ):
        for part in range(2):
            docs = [body.format(i=part * 1000 + i) * 12 for i in range(60)]
            (tmp_path / "raw" / lang).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"content": docs}), tmp_path / "raw" / lang / f"{part}.parquet")
    prepare_starcoder(
        tmp_path / "raw",
        tmp_path / "prep",
        corpus["root"] / "tok",
        val_permille=100,
        chunk_tokens=65 * 32,
        num_workers=1,
    )
    split = str(tmp_path / "prep/train")
    plain = batch_diversity(TokenBlocks(split, 64, window_chunks=1), 16, n_batches=10)
    mixed = batch_diversity(TokenBlocks(split, 64, window_chunks=128), 16, n_batches=10)
    assert plain["chunks_in_source"] >= 20
    assert plain["chunks"] <= 2.5 and mixed["chunks"] >= 10, (plain, mixed)
    assert mixed["documents"] > plain["documents"] >= 4
    assert plain["languages"] < 1.5 and mixed["languages"] == 2.0, (plain, mixed)


def test_document_mask_batches_carry_each_tokens_document(corpus):
    """data.document_mask: training and validation batches carry `documents`, a new id at every
    BOS the prep put in the stream (the corpus uses BOS+EOS boundaries)."""
    long = datamodule(corpus, document_mask=True, block_size=256, validation=False)
    short = datamodule(corpus, document_mask=True)  # its validation loader
    bos = long._train[0].meta["bos_id"]
    train = take(long.train_dataloader(), 20)  # documents run ~2.5K tokens
    for batch in (*train, next(iter(short.val_dataloader()[0]))):
        ids, docs = batch["input_ids"], batch["documents"]
        assert docs.shape == ids.shape and (docs.diff(dim=1) >= 0).all()
        assert torch.equal(docs, (ids == bos).long().cumsum(1))
    assert any((b["documents"][:, -1] > 0).any() for b in train)  # several documents a block
    from tinyrecipe.data.mixture import document_ids

    tokens = np.array([5, 2, 7, 7, 2, 9])  # EOS-only policy: a document starts after each EOS
    assert document_ids(tokens, {"boundary": "eos", "eos_id": 2}, "x").tolist() == [
        0,
        0,
        1,
        1,
        1,
        2,
    ]
    with pytest.raises(ValueError, match="records no document boundaries"):
        document_ids(tokens, {}, "some/dir")


def test_loaders_pin_their_batches_when_training_on_cuda(corpus):
    """Pinned host batches on CUDA (the loops copy them non-blocking), pageable elsewhere; the
    device comes from the Trainer's strategy or, in the Fabric loop, from set_rank_world."""
    from types import SimpleNamespace

    from tinyrecipe.data.datamodule import MixedStreamingDataModule

    root = corpus["root"]
    dm = MixedStreamingDataModule(
        sources=[
            {
                "name": "slim",
                "train": str(root / "slim/train"),
                "validation": str(root / "slim/validation"),
            }
        ],
        block_size=64,
        batch_size=2,
        vocab_size=1024,
    )
    for device, pinned in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0, world_size=1
        )
        assert dm.train_dataloader().pin_memory is pinned
        assert all(loader.pin_memory is pinned for loader in dm.val_dataloader())
    dm.trainer = None
    dm.set_rank_world(0, 1, 1, torch.device("cuda"))
    assert dm.train_dataloader().pin_memory

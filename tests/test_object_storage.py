"""Prepared splits in object storage (s3:// on an S3 server started on 127.0.0.1): the same
batches as the local copy through loader workers, a bounded local cache, and one line for an
endpoint, bucket or split that is not there. (kill -9 and resume on s3://: tests/faults.)"""

import socket

import pytest
import torch

from tinyrecipe.data import DataSource, MixedStreamingDataModule


def datamodule(train: dict, val: str, **kwargs) -> MixedStreamingDataModule:
    sources = [
        DataSource("slimpajama", train["slim"], val, 0.7),
        DataSource("starcoderdata", train["star"], None, 0.3),
    ]
    dm = MixedStreamingDataModule(sources, block_size=64, batch_size=4, vocab_size=1024, **kwargs)
    dm.setup()
    return dm


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_object_storage_reads_the_local_batches_with_a_bounded_cache(corpus, s3_corpus, tmp_path):
    root = corpus["root"]
    local = datamodule(
        {"slim": str(root / "slim/train"), "star": str(root / "star/train")},
        str(root / "slim/validation"),
        shuffle_window_chunks=2,
    )
    remote = datamodule(
        {"slim": f"{s3_corpus}/slim/train", "star": f"{s3_corpus}/star/train"},
        f"{s3_corpus}/slim/validation",
        num_workers=1,
        shuffle_window_chunks=2,
        cache_dir=str(tmp_path / "cache"),
    )
    want = batches(local.train_dataloader(), 24)
    running = iter(remote.train_dataloader())
    got = [next(running) for _ in range(24)]
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    chunks = len(remote._train[0].blocks_per_chunk)
    held = [len(list(d.glob("*.bin"))) for d in (tmp_path / "cache").rglob("tinyrecipe-*")]
    assert chunks > 8 and held and max(held) <= 8  # max(8, 2 x window) per loader process
    del running  # its worker exits, and its cache directory with it
    for a, b in zip(local.val_dataloader(), remote.val_dataloader(), strict=True):
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not list((tmp_path / "cache").rglob("tinyrecipe-*"))  # nor one of validation's


def test_each_split_is_checked_once_before_the_run(s3_corpus, monkeypatch, tmp_path):
    """`prepare_data` (then Lightning's `setup`) asks the endpoint for each split's index once."""
    from tinyrecipe.data import mixture

    asked, real = [], mixture._s3_client

    def client(*args, **kwargs):
        c = real(*args, **kwargs)
        head = c.head_object
        c.head_object = lambda **kw: asked.append(kw["Key"]) or head(**kw)
        return c

    monkeypatch.setattr(mixture, "_s3_client", client)
    sources = [DataSource("slimpajama", f"{s3_corpus}/slim/train", f"{s3_corpus}/slim/validation")]
    dm = MixedStreamingDataModule(sources, block_size=64, batch_size=4, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert sorted(asked) == ["slim/train/index.json", "slim/validation/index.json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_endpoint_bucket_or_split_is_one_line(s3_corpus, monkeypatch, tmp_path):
    def refused(path, error, *needles):
        with pytest.raises(error) as err:
            datamodule({"slim": path, "star": path}, None, cache_dir=str(tmp_path))
        line = str(err.value)
        assert "\n" not in line and all(n in line for n in needles), line

    refused("s3://nope/train", FileNotFoundError, "bucket 'nope'", "does not exist")
    refused(f"{s3_corpus}/slim/missing", FileNotFoundError, "holds no index.json", "aws s3 sync")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    refused(f"{s3_corpus}/slim/train", ConnectionError, "cannot reach", "AWS_ENDPOINT_URL")

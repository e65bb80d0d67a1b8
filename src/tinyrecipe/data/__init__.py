"""Token data: the sample corpus, tokenizers, corpus prep and the mixed streaming DataModule.

`MixedStreamingDataModule` and `DataSource` import Lightning, so they load on first use.
"""

from tinyrecipe.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DataSource",
    "MixedStreamingDataModule",
    "TextTokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
]


def __getattr__(name: str):
    if name in ("DataSource", "MixedStreamingDataModule"):
        from tinyrecipe.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'tinyrecipe.data' has no attribute {name!r}")

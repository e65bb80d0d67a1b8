"""Tokenizers: train a Llama-style BPE, and load a directory holding `tokenizer.json` (the
`tokenizers` library) or a sentencepiece `tokenizer.model` (the Llama-2 tokenizer TinyLlama uses).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tinyrecipe.io import atomic_path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


class TextTokenizer:
    """A loaded tokenizer: `encode_batch`, `decode`, `vocab_size`, `bos_id`, `eos_id` and
    `sha256` (of the tokenizer file: prepared data records it so mismatches are caught)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        json_path, spm_path = directory / "tokenizer.json", directory / "tokenizer.model"
        if json_path.is_file():
            from tokenizers import Tokenizer

            self.path = json_path
            self._hf = Tokenizer.from_file(str(json_path))
            # text is text: "<s>" in a document is three characters, as sentencepiece reads it;
            # BOS/EOS ids come only from the boundary policy, the SFT template or eval's BOS
            self._hf.encode_special_tokens = True
            self._spm = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            bos, eos = special_tokens(directory)
            self.bos_id = self._hf.token_to_id(bos)
            self.eos_id = self._hf.token_to_id(eos)
        elif spm_path.is_file():
            try:
                import sentencepiece
            except ImportError as err:
                raise ImportError(
                    f"{spm_path} is a sentencepiece model; pip install sentencepiece to read it"
                ) from err
            self.path = spm_path
            self._hf = None
            self._spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
            self.vocab_size = self._spm.vocab_size()
            self.bos_id, self.eos_id = self._spm.bos_id(), self._spm.eos_id()
        else:
            raise FileNotFoundError(
                f"tokenizer directory '{directory}' holds neither tokenizer.json nor tokenizer.model; "
                "train one with data_prep/train_tokenizer.py or copy the Llama-2 tokenizer there"
            )
        if self.bos_id is None or self.eos_id is None or self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"tokenizer {self.path} has no BOS or EOS token; name them in "
                f"{directory / 'tokenizer_config.json'} (bos_token, eos_token)"
            )
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        _check_model_ids(directory, self.bos_id, self.eos_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (the boundary policy adds those); a special
        token's text inside a document (`<s>`, `</s>`) is encoded as ordinary characters."""
        if self._hf is not None:
            # encode_batch_fast skips character offsets, which prep never needs
            encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self._spm.encode(texts)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._spm.decode(ids)


def special_tokens(directory: Path) -> tuple[str, str]:
    """The BOS and EOS token strings a Hugging Face tokenizer directory names (its
    `tokenizer_config.json`, else `special_tokens_map.json`), else Llama's `<s>` and `</s>`."""
    bos, eos = BOS, EOS
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = directory / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        bos, eos = _token(config.get("bos_token"), bos), _token(config.get("eos_token"), eos)
    return bos, eos


def _token(value, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else default


def _check_model_ids(directory: Path, bos_id: int, eos_id: int) -> None:
    """A model directory's `config.json` must give the tokenizer's BOS/EOS ids: one line if not."""
    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for what, ours in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        theirs = config.get(what)
        # several EOS ids (chat models): ours must be one of them
        ok = ours in theirs if isinstance(theirs, list) else theirs in (None, ours)
        if not ok:
            raise ValueError(
                f"{path} says {what}={theirs} but its tokenizer gives {ours}; fix one of them "
                "so the data's boundaries are the ids the model was trained with"
            )


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """Open the tokenizer in `directory` (tokenizer.json preferred over tokenizer.model)."""
    return TextTokenizer(directory)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a Llama-style BPE and save `out_dir/tokenizer.json`.

    Like Llama-2's: `<unk>`=0, `<s>`=1, `</s>`=2, then the 256 byte tokens `<0x00>..<0xFF>`
    (byte fallback: no text is ever `<unk>`), sentencepiece-style `▁` for spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [UNK, BOS, EOS]
    if vocab_size < len(specials) + len(BYTE_TOKENS) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the specials and 256 byte tokens need 260"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + BYTE_TOKENS,  # fixes their ids; un-marked as added tokens below
        limit_alphabet=256,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # The byte tokens must be ordinary vocabulary (as in Llama-2), not "added tokens" that
    # would match the literal text "<0x41>" in a document.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "tokenizer.json") as tmp:
        tmp.write_text(json.dumps(spec, ensure_ascii=False))
        Tokenizer.from_file(str(tmp))  # refuse to publish a file that does not load
    return out / "tokenizer.json"

"""Continued pretraining from a Hugging Face checkpoint, in miniature (recipes/continue/
miniature.yaml): a tiny random HF Llama and its tokenizer -> `convert from-hf` -> `prepare` a
mixed-format corpus with that tokenizer -> `fit` -> `convert to-hf`, which transformers loads
with logits equal to ours."""

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tinyrecipe.checkpoint import load_tinyrecipe_checkpoint
from tinyrecipe.cli import main as cli
from tinyrecipe.data.tokenizer import train_bpe_tokenizer
from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.model.hf import to_hf_config

from .conftest import ROOT
from .test_training import scalars

transformers = pytest.importorskip("transformers")

CONFIG = ModelConfig(
    n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=176, vocab_size=512, block_size=64
)


def test_continued_pretraining_from_a_hf_checkpoint_and_back(tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    data = tmp_path / "data/continue"
    hf = data / "hf"
    train_bpe_tokenizer(texts, CONFIG.vocab_size, hf)  # the "released" model's own tokenizer
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(CONFIG)))
    start.save_pretrained(hf)
    assert cli(["convert", "from-hf", str(hf), str(data / "start.ckpt")]) == 0

    # the new corpus in three formats, the replayed old data in a fourth
    raw = tmp_path / "raw"
    (raw / "domain").mkdir(parents=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[:20]).encode()
    (raw / "domain/a.jsonl.gz").write_bytes(gzip.compress(lines))
    pq.write_table(pa.table({"text": texts[20:40]}), raw / "domain/b.parquet")
    (raw / "domain/c.txt").write_text("\n\n\n\n".join(texts[40:60]))
    (raw / "replay.json").write_text(json.dumps([{"text": t} for t in texts[60:]]))
    prep = ["--tokenizer", str(hf), "--chunk-tokens", "4096", "--workers", "1"]
    assert (
        cli(
            [
                "prepare",
                str(raw / "domain"),
                "--separator",
                r"\n\n\n\n",
                "--val-permille",
                "150",
                "--out",
                str(data / "domain"),
                *prep,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "prepare",
                str(raw / "replay.json"),
                "--val-permille",
                "0",
                "--out",
                str(data / "replay"),
                *prep,
            ]
        )
        == 0
    )

    fit = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyrecipe.cli",
            "fit",
            "--config",
            str(ROOT / "recipes/continue/miniature.yaml"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "out/continue-miniature"
    val = scalars(run / "tensorboard")["val/loss"]
    assert val[0][0] == 0 and val[-1][1] < val[0][1]  # the starting model's loss, then lower

    ckpt = run / "checkpoints/last.ckpt"
    assert (
        cli(["convert", "to-hf", str(ckpt), str(tmp_path / "export"), "--tokenizer", str(hf)]) == 0
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", local_files_only=True
    )
    config, state = load_tinyrecipe_checkpoint(ckpt)
    ours = Llama(config)
    ours.load_state_dict(state)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back.eval()(idx).logits - ours.eval()(idx).logits).abs().max().item() <= 1e-5
        assert not torch.equal(
            state["embed.weight"],
            load_tinyrecipe_checkpoint(data / "start.ckpt")[1]["embed.weight"],
        )

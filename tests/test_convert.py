"""Hugging Face export/import: transformers loads our export offline with equal logits, and
from-hf -> to-hf is exact."""

import json
import os
from functools import partial

import pytest
import torch

from tinyrecipe.checkpoint import load_tinyrecipe_checkpoint, save_tinyrecipe_checkpoint
from tinyrecipe.cli import main as cli_main
from tinyrecipe.interop.convert import from_hf, to_hf
from tinyrecipe.model import Llama, ModelConfig, attention
from tinyrecipe.model.hf import to_hf_config

transformers = pytest.importorskip("transformers")

CONFIG = ModelConfig(
    n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=176, vocab_size=1024, block_size=64
)


def checkpoint(tmp_path, config=CONFIG):
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path / "model.ckpt"
    save_tinyrecipe_checkpoint(config, model.state_dict(), path)
    return model.eval(), path


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, corpus, tied):
    config = ModelConfig(**{**CONFIG.to_dict(), "tie_embeddings": tied})
    model, ckpt = checkpoint(tmp_path, config)
    out = to_hf(ckpt, tmp_path / "hf", tokenizer_dir=corpus["root"] / "tok")
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    idx = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx).logits).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    from tinyrecipe.data import load_tokenizer

    ours = load_tokenizer(corpus["root"] / "tok")
    text = "def main():\n    return '</s>' + '<s>'"  # special-token text is text
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    # plain tok(text) starts with BOS, exactly the ids `tinyrecipe generate` feeds the model
    assert tok(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def test_sharded_export_and_round_trip_are_exact(tmp_path):
    model, ckpt = checkpoint(tmp_path)
    out = to_hf(ckpt, tmp_path / "hf", max_shard_gb=0.0002)  # 200 kB shards
    assert (out / "model.safetensors.index.json").is_file() and len(
        list(out.glob("model-*.safetensors"))
    ) > 1
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would write 0600
    back = from_hf(out, tmp_path / "back.ckpt")
    config, state = load_tinyrecipe_checkpoint(back)
    assert config == CONFIG
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_from_hf_reads_pytorch_model_bin_and_round_trips(tmp_path):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(CONFIG)))
    (tmp_path / "hf").mkdir()
    torch.save(hf.state_dict(), tmp_path / "hf/pytorch_model.bin")
    (tmp_path / "hf/config.json").write_text(json.dumps(to_hf_config(CONFIG)))
    assert cli_main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "x.ckpt")]) == 0
    assert cli_main(["convert", "to-hf", str(tmp_path / "x.ckpt"), str(tmp_path / "hf2")]) == 0
    from safetensors.torch import load_file

    again = load_file(tmp_path / "hf2/model.safetensors")
    for key, tensor in hf.state_dict().items():
        assert torch.equal(again[key], tensor), key


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["convert", "to-hf", str(tmp_path / "missing.ckpt"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["convert", "from-hf", str(tmp_path), str(tmp_path / "o.ckpt")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_init_from_starts_training_from_converted_weights(tmp_path):
    from tinyrecipe.train.module import CausalLMModule

    model, ckpt = checkpoint(tmp_path)
    fields = {
        k: v
        for k, v in CONFIG.to_dict().items()
        if k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "block_size")
    }
    module = CausalLMModule(preset="tiny", config=fields, init_from=str(ckpt))
    module.configure_model()
    for key, tensor in model.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], tensor), key
    wrong = CausalLMModule(preset="tiny", init_from=str(ckpt))
    with pytest.raises(ValueError, match="holds a different model"):
        wrong.configure_model()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decoding_equals_recomputing(n_kv_head, monkeypatch):
    from tinyrecipe import generation as module
    from tinyrecipe.generation import generate

    config = ModelConfig(**{**CONFIG.to_dict(), "n_kv_head": n_kv_head})
    torch.manual_seed(0)
    model = Llama(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    fast = generate(model, prompt, 20, temperature=0)
    slow = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(fast, slow) and fast.shape == (2, 27)
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        step_logits = [model(fast[:, :7], cache=cache).logits[:, -1]]
        step_logits += [model(fast[:, t : t + 1], cache=cache).logits[:, -1] for t in range(7, 26)]
        full = model(fast[:, :26]).logits
    assert torch.allclose(torch.stack(step_logits, 1), full[:, 6:], atol=1e-5)
    static = model.new_kv_cache(2, static=True)  # the whole context, masked: fixed shapes
    with torch.no_grad():
        step_logits = [model(fast[:, :7], cache=static).logits[:, -1]]
        step_logits += [model(fast[:, t : t + 1], cache=static).logits[:, -1] for t in range(7, 26)]
    assert torch.allclose(torch.stack(step_logits, 1), full[:, 6:], atol=1e-5)
    if n_kv_head == 2:  # as on CUDA: the cache's mask with each KV head's query group folded
        grouped = attention.masked_sdpa
        monkeypatch.setattr(attention, "masked_sdpa", partial(grouped, ungroup=True))
        static = model.new_kv_cache(2, static=True)
        with torch.no_grad():
            folded = [model(fast[:, :7], cache=static).logits[:, -1]]
            folded += [model(fast[:, t : t + 1], cache=static).logits[:, -1] for t in range(7, 26)]
        assert torch.allclose(torch.stack(folded, 1), full[:, 6:], atol=1e-5)
    if n_kv_head == 2:  # one graph for every step and prompt length (aot_eager: no C++ build)
        options = {"fullgraph": True, "dynamic": False, "backend": "aot_eager"}
        monkeypatch.setattr(module, "compile_options", lambda device: options)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(generate(model, prompt, 20, temperature=0, compile=True), fast)
            shorter = generate(model, prompt[:, :4], 23, temperature=0, compile=True)
        assert torch.equal(shorter, generate(model, prompt[:, :4], 23, temperature=0))
    sampled = [
        generate(
            model,
            prompt,
            10,
            temperature=0.8,
            top_k=20,
            top_p=0.9,
            generator=torch.Generator().manual_seed(1),
            use_cache=c,
        )
        for c in (True, False)
    ]
    assert torch.equal(*sampled)


def test_greedy_generation_equals_transformers(tmp_path):
    from tinyrecipe.generation import generate

    model, ckpt = checkpoint(tmp_path)
    out = to_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    prompt = torch.randint(3, CONFIG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    ours = generate(model, prompt, 24, temperature=0)
    theirs = hf.generate(
        prompt,
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    assert torch.equal(ours, theirs)


def test_generation_stops_at_the_first_all_eos_column_however_often_it_looks(monkeypatch):
    """EOS is looked for every EOS_CHECK_EVERY tokens (no host read per token); the result is
    the full generation cut just after the first position where every row drew EOS."""
    from tinyrecipe import generation as module
    from tinyrecipe.generation import EOS_CHECK_EVERY, generate

    looks, look = [], module._eos_column
    monkeypatch.setattr(module, "_eos_column", lambda *a: looks.append(1) or look(*a))

    torch.manual_seed(0)
    model = Llama(CONFIG).eval()
    for batch in (1, 2):
        prompt = torch.randint(
            0, CONFIG.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(3)
        )
        sampling = {"temperature": 1.5, "top_k": 8}
        full = generate(model, prompt, 40, generator=torch.Generator().manual_seed(7), **sampling)
        new = full[:, 5:]
        for eos in new.flatten().unique().tolist()[:6]:
            common = (new == eos).all(0).nonzero()
            stop = int(common[0]) + 1 if common.numel() else 40
            for n in (1, EOS_CHECK_EVERY - 1, EOS_CHECK_EVERY, EOS_CHECK_EVERY + 1, 40):
                got = generate(
                    model,
                    prompt,
                    n,
                    eos_id=eos,
                    generator=torch.Generator().manual_seed(7),
                    **sampling,
                )
                assert torch.equal(got, full[:, : 5 + min(n, stop)]), (batch, eos, n)
    looks.clear()
    generate(model, prompt, 40, eos_id=-1, temperature=0)  # never drawn: runs to the end
    assert len(looks) == 40 // EOS_CHECK_EVERY + 1

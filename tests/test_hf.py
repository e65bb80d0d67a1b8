"""Numerical parity with Hugging Face `LlamaForCausalLM` (random weights, fp32, no hub)."""

import pytest
import torch

from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.model.hf import (
    from_hf_config,
    from_hf_state_dict,
    permute_meta_to_hf,
    to_hf_config,
    to_hf_state_dict,
)

pytestmark = pytest.mark.fast  # make test-fast

transformers = pytest.importorskip("transformers")

CASES = {
    "mha": dict(n_head=4, n_kv_head=4),
    "gqa": dict(n_head=8, n_kv_head=2),
    "mqa": dict(n_head=8, n_kv_head=1),
    "odd_heads": dict(n_head=3, n_kv_head=3, d_model=48),
    "odd_gqa": dict(n_head=9, n_kv_head=3, d_model=72),
    "rope_theta_500k": dict(n_head=4, n_kv_head=2, rope_theta=500000.0),
    "tied": dict(n_head=4, n_kv_head=2, tie_embeddings=True),
}


def make_config(**fields) -> ModelConfig:
    base = dict(n_layer=2, d_model=64, d_ff=112, vocab_size=257, block_size=64, norm_eps=1e-5)
    base.update(fields)
    return ModelConfig(**base)


def make_hf(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**to_hf_config(config), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def ours_from(hf, config: ModelConfig) -> Llama:
    model = Llama(config).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_loss_match_hf(case):
    config = make_config(**CASES[case])
    hf = make_hf(config)
    ours = ours_from(hf, config)
    idx = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = idx.clone()
    labels[0, :7] = -100
    with torch.no_grad():
        ref = hf(input_ids=idx, labels=labels)
        logits = ours(idx).logits
        loss = ours(idx[:, :-1], labels[:, 1:]).loss
    assert (logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def test_gradients_match_hf():
    config = make_config(**CASES["gqa"])
    hf = make_hf(config)
    ours = ours_from(hf, config)
    idx = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    hf(input_ids=idx, labels=idx).loss.backward()
    ours(idx[:, :-1], idx[:, 1:]).loss.backward()
    grads = {k: v for k, v in ((n, p.grad) for n, p in ours.named_parameters())}
    hf_grads = to_hf_state_dict(grads, config)
    for name, p in hf.named_parameters():
        assert torch.allclose(p.grad, hf_grads[name], atol=1e-6), name


@pytest.mark.parametrize("case", ["gqa", "tied"])
def test_state_dict_round_trip_is_exact(case):
    config = make_config(**CASES[case])
    torch.manual_seed(0)
    ours = Llama(config)
    hf_sd = to_hf_state_dict(ours.state_dict(), config)
    hf = make_hf(config)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_embeddings else set())
    back = from_hf_state_dict(hf_sd, config)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_config_round_trip():
    for fields in CASES.values():
        config = make_config(**fields)
        assert from_hf_config(to_hf_config(config)) == config
    hf_config = transformers.LlamaConfig(**to_hf_config(ModelConfig()))
    assert from_hf_config(hf_config) == ModelConfig()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling"),
        ({"head_dim": 32}, "head_dim=32"),
    ],
)
def test_unsupported_hf_configs_are_refused_by_name(change, message):
    d = to_hf_config(make_config())
    d.update(change)
    with pytest.raises(ValueError, match=message):
        from_hf_config(d)


def test_unknown_or_missing_hf_weights_are_named():
    config = make_config()
    sd = to_hf_state_dict(Llama(config).state_dict(), config)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old HF buffer: dropped
    from_hf_state_dict(sd, config)
    with pytest.raises(KeyError, match="model.layers.5.mlp.up_proj.weight"):
        from_hf_state_dict({**sd, "model.layers.5.mlp.up_proj.weight": torch.zeros(1)}, config)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="lack 'model.layers.1.mlp.up_proj.weight'"):
        from_hf_state_dict(sd, config)


def test_meta_interleaved_rope_equals_rotate_half_on_permuted_weights():
    """Meta's RoPE rotates pairs (2i, 2i+1) as complex numbers; HF/ours rotate (i, i + D/2) after
    `permute_meta_to_hf`. The attention scores q·k must be identical."""
    from tinyrecipe.model.llama import apply_rope, rope_cache

    torch.manual_seed(0)
    n_heads, head_dim, d, T = 2, 8, 16, 5
    wq, wk = torch.randn(n_heads * head_dim, d), torch.randn(n_heads * head_dim, d)
    x = torch.randn(1, T, d)

    def meta_rope(t):  # (B, T, H, D), interleaved pairs as complex numbers
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(T).float(), freqs)
        tc = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(
            tc * torch.polar(torch.ones_like(angles), angles)[:, None]
        ).flatten(-2)

    def scores(q, k):
        return torch.einsum("bthd,bshd->bhts", q, k)

    q_meta = meta_rope((x @ wq.T).view(1, T, n_heads, head_dim))
    k_meta = meta_rope((x @ wk.T).view(1, T, n_heads, head_dim))
    cos, sin = rope_cache(T, head_dim, 10000.0)
    q_hf = apply_rope(
        (x @ permute_meta_to_hf(wq, n_heads).T).view(1, T, n_heads, head_dim), cos, sin
    )
    k_hf = apply_rope(
        (x @ permute_meta_to_hf(wk, n_heads).T).view(1, T, n_heads, head_dim), cos, sin
    )
    assert torch.allclose(scores(q_meta, k_meta), scores(q_hf, k_hf), atol=1e-5)
    # Without the permutation the layouts disagree: the permutation is doing real work.
    q_raw = apply_rope((x @ wq.T).view(1, T, n_heads, head_dim), cos, sin)
    k_raw = apply_rope((x @ wk.T).view(1, T, n_heads, head_dim), cos, sin)
    assert not torch.allclose(scores(q_meta, k_meta), scores(q_raw, k_raw), atol=1e-3)

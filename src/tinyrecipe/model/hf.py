"""Hugging Face `LlamaForCausalLM` <-> tinyrecipe: state-dict keys and `LlamaConfig` fields.

The one place the name mapping lives. Works on plain dicts and tensors, so it needs no
`transformers` import.

RoPE layout: Meta's original Llama checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...;
HF's conversion script permutes the rows of q_proj/k_proj so that `rotate_half` pairs dim i with
dim i + head_dim/2. tinyrecipe uses that same rotate-half layout, so HF q/k rows map onto ours
unchanged: the only reshaping is concatenating q/k/v into our fused `qkv` and gate/up into
`gate_up` (and splitting them back). `permute_meta_to_hf` is provided for Meta-layout weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from tinyrecipe.model.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Per-layer HF names that map one-to-one (ours <- theirs).
_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def to_hf_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """`LlamaConfig` keyword arguments (also a valid config.json body) for `config`.

    Both `rope_theta` (transformers 4.x) and `rope_parameters` (5.x) are written.
    `extra` adds or overrides fields such as bos_token_id / eos_token_id.
    """
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.std,
    }
    hf.update(extra)
    return hf


def from_hf_config(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """A `ModelConfig` from a `LlamaConfig` (or its config.json dict).

    Raises ValueError naming the field for what this decoder does not implement
    (biases, non-SiLU activations, RoPE scaling, a head_dim other than hidden/heads).
    """
    d = dict(hf.to_dict() if hasattr(hf, "to_dict") else hf)
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"config model_type={d['model_type']!r} is not 'llama'")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if d.get(key, ok) != ok:
            raise ValueError(f"config {key}={d[key]!r} is not supported (tinyrecipe needs {ok!r})")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = rope.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ValueError(
            f"config RoPE scaling {scaling or rope!r} is not supported; only plain RoPE (rope_type 'default')"
        )
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    n_head = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // n_head
    if head_dim * n_head != d["hidden_size"]:
        raise ValueError(
            f"config head_dim={head_dim} x num_attention_heads={n_head} != hidden_size="
            f"{d['hidden_size']}; tinyrecipe needs head_dim = hidden_size / num_attention_heads"
        )
    return ModelConfig(
        n_layer=d["num_hidden_layers"],
        d_model=d["hidden_size"],
        n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head,
        d_ff=d["intermediate_size"],
        vocab_size=d["vocab_size"],
        block_size=d.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Our `Llama` state dict -> `LlamaForCausalLM` state dict.

    With tied embeddings `lm_head.weight` is left out (HF re-ties it on load).
    """
    q_dim, kv_dim = config.d_model, config.n_kv_head * config.head_dim
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_RENAMES.items():
        out[theirs] = state_dict[ours]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state_dict["lm_head.weight"]
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_RENAMES.items():
            out[dst + theirs] = state_dict[src + ours]
        q, k, v = state_dict[src + "attn.qkv.weight"].split((q_dim, kv_dim, kv_dim))
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        gate, up = state_dict[src + "mlp.gate_up.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
    return out


# Our LoRA targets -> (their parent inside an HF layer, the HF linear layers whose outputs the
# fused layer's rows hold, in order)
_PEFT_TARGETS = {
    "attn.qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "attn.proj": ("self_attn", ("o_proj",)),
    "mlp.gate_up": ("mlp", ("gate_proj", "up_proj")),
    "mlp.proj": ("mlp", ("down_proj",)),
}


def to_peft_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our LoRA adapters (the `.lora_a` / `.lora_b` entries of a LoRA run's state dict) -> a PEFT
    LoRA adapter's state dict for `LlamaForCausalLM`, and its `target_modules`. A fused layer's
    adapter becomes one per HF layer, exactly: A shared, B split by rows like the weight."""
    q_dim, kv_dim = config.d_model, config.n_kv_head * config.head_dim
    rows = {
        "attn.qkv": (q_dim, kv_dim, kv_dim),
        "attn.proj": (config.d_model,),
        "mlp.gate_up": (config.d_ff, config.d_ff),
        "mlp.proj": (config.d_model,),
    }
    out: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for i in range(config.n_layer):
        for target, (parent, names) in _PEFT_TARGETS.items():
            ours = f"blocks.{i}.{target}"
            if f"{ours}.lora_a" not in state_dict:
                continue
            a = state_dict[f"{ours}.lora_a"]
            parts = state_dict[f"{ours}.lora_b"].split(rows[target])
            for name, b in zip(names, parts, strict=True):
                theirs = f"base_model.model.model.layers.{i}.{parent}.{name}"
                out[f"{theirs}.lora_A.weight"] = a
                out[f"{theirs}.lora_B.weight"] = b
                modules.add(name)
    return out, sorted(modules)


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` state dict -> our `Llama` state dict.

    Raises KeyError naming any HF key it does not know (old checkpoints' `rotary_emb.inv_freq`
    buffers are derived data and are dropped) or any key it needs and does not find.
    """
    layers: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(config.n_layer)}
    out: dict[str, torch.Tensor] = {}
    top = {theirs: ours for ours, theirs in _TOP_RENAMES.items()}
    for key, tensor in hf_state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in top:
            out[top[key]] = tensor
        elif key == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif (m := _LAYER.match(key)) and int(m.group(1)) in layers:
            layers[int(m.group(1))][m.group(2)] = tensor
        else:
            raise KeyError(
                f"unexpected Hugging Face weight {key!r} for a {config.n_layer}-layer Llama"
            )
    if config.tie_embeddings:  # our state dict names the shared matrix under both keys
        out["lm_head.weight"] = out["embed.weight"]
    elif "lm_head.weight" not in out:
        raise KeyError("Hugging Face weights lack 'lm_head.weight' but the config is untied")
    theirs_to_ours = {theirs: ours for ours, theirs in _LAYER_RENAMES.items()}
    for i, layer in layers.items():
        dst = f"blocks.{i}."

        def take(name: str, i: int = i, layer: dict = layer) -> torch.Tensor:
            if name not in layer:
                raise KeyError(f"Hugging Face weights lack 'model.layers.{i}.{name}'")
            return layer.pop(name)

        for theirs, ours in theirs_to_ours.items():
            out[dst + ours] = take(theirs)
        out[dst + "attn.qkv.weight"] = torch.cat(
            [take(f"self_attn.{p}_proj.weight") for p in "qkv"], dim=0
        )
        out[dst + "mlp.gate_up.weight"] = torch.cat(
            [take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")], dim=0
        )
        if layer:
            raise KeyError(f"unexpected Hugging Face weights in layer {i}: {sorted(layer)}")
    return out


def permute_meta_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved RoPE pairs to rotate-half layout.

    The same permutation HF's `convert_llama_weights_to_hf.py` applies; needed only for
    weights in Meta's original format, never for HF checkpoints.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

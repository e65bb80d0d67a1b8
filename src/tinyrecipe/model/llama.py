"""The Llama-2 decoder TinyLlama trains: RoPE, RMSNorm pre-norm, SwiGLU, grouped-query attention.

Plain PyTorch, readable top to bottom. The RoPE layout is "rotate half" (the first half of each
head's dims pairs with the second half), the same layout Hugging Face's `LlamaForCausalLM` uses,
so HF weights map onto this model by renaming and concatenation alone (`tinyrecipe.model.hf`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyrecipe.model.attention import (
    DocumentMask,
    causal_attention,
    document_backend,
    document_positions,
)
from tinyrecipe.model.config import ModelConfig
from tinyrecipe.model.lora import LoRALinear
from tinyrecipe.model.loss import cross_entropy_z, linear_cross_entropy_z


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 (as Llama and HF do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)
        return self.weight * y

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cache(
    block_size: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (block_size, head_dim), fp32, in rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(block_size, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by position; cos/sin are (T, D), or (B, T, D) for positions that
    differ per row (RoPE restarted at each document)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # over heads
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the positions seen so far, for one block (generation only).

    Growing (the default): `length` is an int and attention sees the filled part. Static
    (`static=True`): `length` is a 0-d tensor on the device, new keys are written at it and
    attention sees the whole buffer through a mask, so every decoding step has the same shapes
    and no host value: what `torch.compile` (and CUDA graphs) need to run one graph per token."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        like: torch.Tensor,
        static: bool = False,
    ) -> None:
        shape = (batch, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = torch.zeros((), dtype=torch.long, device=like.device) if static else 0

    def positions(self, T: int) -> torch.Tensor | slice:
        """Where the next T tokens go: a slice (growing) or a (T,) tensor (static)."""
        if isinstance(self.length, int):
            return slice(self.length, self.length + T)
        return self.length + torch.arange(T, device=self.k.device)

    def append(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, T, H_kv, hd) after the cached positions; return the keys and values
        to attend to and, for a static cache, the (T, max_len) mask of those each query sees."""
        T = k.size(1)
        where = self.positions(T)
        if isinstance(where, slice):
            self.k[:, where], self.v[:, where] = k, v
            self.length = where.stop
            return self.k[:, : where.stop], self.v[:, : where.stop], None
        self.k.index_copy_(1, where, k)
        self.v.index_copy_(1, where, v)
        self.length.add_(T)
        keys = torch.arange(self.k.size(1), device=self.k.device)
        return self.k, self.v, keys[None, :] <= where[:, None]


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE; q, k and v come from one fused projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        self.backend = config.attention
        kv_dim = config.n_kv_head * config.head_dim
        self.qkv = nn.Linear(config.d_model, config.d_model + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        documents: DocumentMask | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split((q_dim, kv_dim, kv_dim), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:  # generation: attend to every earlier position as well
            k, v, mask = cache.append(k, v)  # (B, T_past + T or max_len, H_kv, hd)
        y = causal_attention(q, k, v, self.backend, documents, mask)  # (B, T, H, hd)
        return self.proj(y.reshape(B, T, q_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one fused projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        documents: DocumentMask | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, documents)
        return x + self.mlp(self.mlp_norm(x))


class LMOutput(NamedTuple):
    """What `Llama.forward` returns.

    logits: (B, T, vocab), or None when the loss is computed chunk by chunk
        (`config.loss_chunk_size`) and the full logits never exist.
    loss: with targets, the mean cross-entropy over positions whose target is not IGNORE_INDEX,
        plus the z-loss when `config.z_loss` is set; None without targets.
    z_loss: the z-loss part of `loss` (detached); None without targets or with z-loss off.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class Llama(nn.Module):
    """Token embedding, `n_layer` blocks, final RMSNorm, LM head (tied to the embedding or not)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        device = torch.empty(0).device  # the caller's default device (meta under FSDP2 init)
        # Layers are built on meta and initialised once, by init_weights: no time spent on
        # PyTorch's default init, and the same seed gives the same weights eagerly or from meta.
        with torch.device("meta"):
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.norm = RMSNorm(config.d_model, config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            # Derived from the config, so not saved in checkpoints (persistent=False).
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # the chunked loss's bf16/fp16 softmax work as compiled kernels (set by compile_blocks)
        self.compile_loss = False
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def new_kv_cache(
        self, batch: int = 1, max_len: int | None = None, static: bool = False
    ) -> list[KVCache]:
        """Empty caches, one per block, for up to `max_len` positions (default block_size);
        `static`: fixed shapes for compiled decoding (`KVCache`)."""
        cfg, like = self.config, self.embed.weight
        max_len = max_len or cfg.block_size
        return [
            KVCache(batch, max_len, cfg.n_kv_head, cfg.head_dim, like, static) for _ in self.blocks
        ]

    @torch.no_grad()
    def init_weights(self) -> None:
        """TinyLlama's init; also (re)builds the RoPE tables. Call after `to_empty()` from meta."""
        cfg = self.config
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = rope_cache(
            cfg.block_size, cfg.head_dim, cfg.rope_theta, device
        )
        out_std = 1.0 / math.sqrt(cfg.d_model) / cfg.n_layer
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output_proj = name.endswith(".proj")  # attention and MLP output projections
                nn.init.normal_(module.weight, std=out_std if is_output_proj else cfg.std)
                if isinstance(module, LoRALinear):  # built on meta with an adapter
                    module.reset_lora_parameters()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if cfg.tie_embeddings:  # re-tie: to_empty() may have separated the shared tensor
            self.lm_head.weight = self.embed.weight

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        documents: torch.Tensor | None = None,
    ) -> LMOutput:
        """idx (B, T) token ids -> `LMOutput`: the logits, and with targets (B, T) the loss and
        its z-loss part. With `cache` (one KVCache per block, from `new_kv_cache`), idx continues
        the cached sequence (generation). With
        `documents` (B, T) document ids (non-decreasing along a row: packed blocks), a token
        attends only to earlier tokens of its own document, and with
        `config.document_positions == "restart"` its RoPE position counts from its document's
        first token."""
        T = idx.size(1)
        where = cache[0].positions(T) if cache else slice(0, T)
        # a static cache's position stays on the device: its buffer bounds it instead
        if isinstance(where, slice) and where.stop > self.config.block_size:
            raise ValueError(
                f"sequence length {where.stop} exceeds block_size {self.config.block_size}"
            )
        cos, sin = self.rope_cos[where], self.rope_sin[where]
        mask = None
        if documents is not None:
            if cache:
                raise ValueError("documents (a document mask) is for training, not generation")
            weight = self.embed.weight  # the dtype q will have: autocast's when it is on
            kind = weight.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            probe = weight.new_empty(0, dtype=dtype or weight.dtype)
            varlen = document_backend(probe, self.config.attention) in ("fa3", "flash", "varlen")
            mask = DocumentMask.from_documents(documents, varlen=varlen)
            if self.config.document_positions == "restart":
                positions = document_positions(documents)
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(idx)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[i] if cache else None, mask)
        x = self.norm(x)
        z_loss = self.config.z_loss
        if targets is not None and self.config.loss_chunk_size:
            chunk = self.config.loss_chunk_size
            loss, z_part = linear_cross_entropy_z(
                x, self.lm_head.weight, targets, chunk, z_loss, self.compile_loss
            )
            return LMOutput(None, loss, z_part if z_loss else None)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return LMOutput(logits)
        loss, z_part = cross_entropy_z(logits, targets, z_loss)
        return LMOutput(logits, loss, z_part if z_loss else None)

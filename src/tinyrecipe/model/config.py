"""`ModelConfig`: the shape of a Llama-2 decoder, and the named presets (the one place they live)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any, get_type_hints


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-2 style decoder (RoPE, RMSNorm pre-norm, SwiGLU, GQA, no biases).

    The defaults are TinyLlama-1.1B. `init_std=None` means TinyLlama's sqrt(2 / (5 * d_model)).
    `attention` picks the kernel: "auto" (the fastest the GPU has: FlashAttention-3 or SDPA's
    cuDNN kernel on Hopper, FlashAttention-2 on Ampere when it imports; SDPA elsewhere), or one
    forced: "sdpa", "cudnn", "flash", "fa3" (an error where it cannot run). `loss_chunk_size` > 0 computes
    the training loss with `linear_cross_entropy` that many tokens at a time, never holding the
    full (tokens x vocab) logits; 0 uses the plain `F.cross_entropy` reference. `z_loss` > 0
    adds z_loss x mean(log Z)² (the log-partition of the logits) to the training loss.
    `document_positions`: under a document mask, RoPE positions "continue" through the packed
    block (the default; attention scores depend only on relative positions, so the logits equal
    the document's alone either way) or "restart" at each document.
    """

    n_layer: int = 22
    d_model: int = 2048
    n_head: int = 32
    n_kv_head: int = 4
    d_ff: int = 5632
    vocab_size: int = 32000
    block_size: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float | None = None
    attention: str = "auto"
    loss_chunk_size: int = 0
    z_loss: float = 0.0
    document_positions: str = "continue"

    def __post_init__(self) -> None:
        for key in (
            "n_layer",
            "d_model",
            "n_head",
            "n_kv_head",
            "d_ff",
            "vocab_size",
            "block_size",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)} must be positive")
        if self.d_model % self.n_head:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head so that d_model / n_head is a whole head size"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"ModelConfig.n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}; "
                "grouped-query attention needs equal-sized groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head size {self.head_dim} must be even for RoPE")
        if self.loss_chunk_size < 0:
            raise ValueError(
                f"ModelConfig.loss_chunk_size={self.loss_chunk_size} must be >= 0 (0: plain loss)"
            )
        if self.z_loss < 0:
            raise ValueError(
                f"ModelConfig.z_loss={self.z_loss} must be >= 0 (0: off; PaLM used 1e-4)"
            )
        if self.document_positions not in ("continue", "restart"):
            raise ValueError(
                f"ModelConfig.document_positions={self.document_positions!r} is unknown; use "
                "'continue' (positions run through the packed block) or 'restart' (per document)"
            )
        if self.attention not in ("auto", "sdpa", "cudnn", "flash", "fa3"):
            raise ValueError(
                f"ModelConfig.attention={self.attention!r} is unknown; use 'auto', 'sdpa', "
                "'cudnn', 'flash' or 'fa3'"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def std(self) -> float:
        """Standard deviation of the normal init (TinyLlama: sqrt(2 / (5 d)))."""
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5 * self.d_model))

    def num_params(self, *, embedding: bool = True) -> int:
        """Exact parameter count of `Llama(self)`; `embedding=False` leaves out the input table.

        With tied embeddings the shared matrix counts once, as the LM head (it is a matmul there;
        the input lookup is not).
        """
        d, kv = self.d_model, self.n_kv_head * self.head_dim
        attn = d * (d + 2 * kv) + d * d  # fused qkv, output projection
        mlp = 3 * d * self.d_ff  # gate, up, down
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        head = self.vocab_size * d
        table = 0 if self.tie_embeddings or not embedding else self.vocab_size * d
        return self.n_layer * per_layer + d + head + table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_shape(
        cls,
        d_model: int,
        n_layer: int,
        *,
        head_dim: int = 64,
        kv_ratio: int = 8,
        ffn_multiple: int = 256,
        **overrides: Any,
    ) -> ModelConfig:
        """A config from width and depth by TinyLlama's shape rules.

        Heads of size `head_dim`; one KV head per `kv_ratio` query heads (at least one);
        SwiGLU width 8/3·d rounded up to a multiple of `ffn_multiple` (2048 -> 5632).
        """
        if d_model % head_dim:
            raise ValueError(f"d_model={d_model} is not a multiple of head_dim={head_dim}")
        n_head = d_model // head_dim
        n_kv_head = max(1, n_head // kv_ratio)
        while n_head % n_kv_head:
            n_kv_head -= 1
        d_ff = math.ceil(8 * d_model / 3 / ffn_multiple) * ffn_multiple
        fields = dict(
            n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, d_ff=d_ff
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with fields replaced: `ModelConfig.from_name("tiny", n_layer=2)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


# ModelConfig's fields, each optional: what a recipe's `model.config` may change in a preset.
# None keeps the preset's value, so recipe overlays merge key by key and a misspelt key is
# refused by name (jsonargparse validates against these fields).
ModelOverrides = make_dataclass(
    "ModelOverrides",
    [
        (f.name, get_type_hints(ModelConfig)[f.name] | None, field(default=None))
        for f in fields(ModelConfig)
    ],
)
ModelOverrides.__module__ = __name__
ModelOverrides.__doc__ = "ModelConfig fields replacing a preset's (None: the preset's value)."


DEFAULT_PRESET = "tiny"  # a recipe's model.preset when it names none


def resolve_config(preset: str = DEFAULT_PRESET, overrides: Any = None) -> ModelConfig:
    """The one place a preset and its overrides (a dict, a ModelOverrides, or None) become a
    ModelConfig; fields given as None keep the preset's value."""
    return ModelConfig.from_name(preset, **overrides_dict(overrides))


def overrides_dict(overrides: Any = None) -> dict[str, Any]:
    """The fields a dict or ModelOverrides sets (None values dropped), as a plain dict."""
    if overrides is None:
        return {}
    items = overrides.items() if isinstance(overrides, dict) else asdict(overrides).items()
    return {k: v for k, v in items if v is not None}


# The fields that decide the parameters' shapes (two configs that agree on these share weights).
SHAPE_FIELDS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "tie_embeddings")

PRESETS: dict[str, ModelConfig] = {
    # The paper's model: 1,100,048,384 parameters.
    "tinyllama-1.1b": ModelConfig(),
    # CPU quickstart/tests: ~7M parameters at vocab 8192 (the sample-corpus tokenizer's size).
    "tiny": ModelConfig(
        n_layer=4, d_model=256, n_head=8, n_kv_head=2, d_ff=688, vocab_size=8192, block_size=256
    ),
    # An ablation ladder by the same shape rules as TinyLlama (Llama-2 vocab, context 2048).
    "llama-20m": ModelConfig.from_shape(256, 4),
    "llama-60m": ModelConfig.from_shape(512, 8),
    "llama-160m": ModelConfig.from_shape(768, 18),
    "llama-410m": ModelConfig.from_shape(1024, 32),
}

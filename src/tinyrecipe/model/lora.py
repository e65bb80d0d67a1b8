"""LoRA (Hu et al., 2021, arXiv 2106.09685): fine-tune a frozen decoder through low-rank updates.

`apply_lora` swaps chosen linear layers of every decoder block for `LoRALinear`, which computes
`x W^T + scale * (x A^T) B^T` with `scale = alpha / rank`, A (rank x in) initialised like a
linear layer and B (out x rank) at zero, so the model starts exactly where the base did. Every
other parameter is frozen, so gradients and AdamW states exist only for A and B.

Parameter names stay as they were (`blocks.0.attn.qkv.weight`), with `.lora_a` and `.lora_b`
beside them; `merge_lora` folds a state dict's adapters into their weights (W + scale * B A),
which is how every reader of a checkpoint (`tinyrecipe convert`, `eval`, `generate`,
`model.init_from`) sees a LoRA run: as the plain decoder it is equal to.

A fused projection (`attn.qkv`, `mlp.gate_up`) takes one adapter over its whole output: q, k and
v (gate and up) share A and each has its own rows of B.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Linear layers of a block, by their path inside it; the head is left out (the chunked loss
# reads its weight directly).
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.proj")
LORA_ALPHA = 16.0  # model.lora.alpha's default


def lora_of(hparams) -> tuple[int, float] | None:
    """(rank, alpha) of a module's or a checkpoint's hyper-parameters (their `lora` group, or the
    flat `lora_rank`/`lora_alpha` of checkpoints written before it); None: no LoRA."""
    group = hparams.get("lora")
    if isinstance(group, dict):
        rank, alpha = group.get("rank"), group.get("alpha", LORA_ALPHA)
    else:
        rank, alpha = hparams.get("lora_rank"), hparams.get("lora_alpha", LORA_ALPHA)
    return (int(rank), float(alpha)) if rank else None


class LoRALinear(nn.Linear):
    """A bias-free linear layer plus a trainable low-rank update `scale * B A`."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        if self.lora_a.device.type != "meta":
            self.reset_lora_parameters()

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """`base` with an adapter: the same weight tensor (not copied), the adapter on its
        device (initialised) or on meta (initialised by `Llama.init_weights`)."""
        weight = base.weight
        lora = cls(base.in_features, base.out_features, rank, alpha, device="meta")
        lora.weight = weight
        for name in ("lora_a", "lora_b"):
            like = getattr(lora, name)
            empty = torch.empty(like.shape, device=weight.device, dtype=weight.dtype)
            setattr(lora, name, nn.Parameter(empty))
        if weight.device.type != "meta":
            lora.reset_lora_parameters()
        return lora

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises a weight, B zero: the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return F.linear(x, self.weight) + update * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def check_lora(rank: int | None, alpha: float, targets, float8: bool = False) -> None:
    """One line for a LoRA setting that cannot work."""
    if rank is None:
        return
    if float8:
        raise ValueError(
            "model.speed.float8 and model.lora.rank cannot be combined (float8 would replace the "
            "adapted layers); set model.speed.float8: false for LoRA"
        )
    if int(rank) != rank or rank < 1:
        raise ValueError(f"model.lora.rank={rank} must be a positive integer (e.g. 8 or 16)")
    if alpha <= 0:
        raise ValueError(f"model.lora.alpha={alpha} must be positive (e.g. 2 x lora_rank)")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"model.lora.targets {list(targets)} must be a non-empty list of "
            f"{', '.join(LORA_TARGETS)}"
        )


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS
) -> list[nn.Parameter]:
    """Swap each block's `targets` for `LoRALinear` (same weight tensor, on its device or meta)
    and freeze every other parameter. Returns the trainable parameters (the adapters)."""
    check_lora(rank, alpha, targets)
    for block in model.blocks:
        for target in targets:
            parent_name, _, name = target.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, name, LoRALinear.wrap(getattr(parent, name), rank, alpha))
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith((".lora_a", ".lora_b")))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def lora_params(config, rank: int | None, targets=LORA_TARGETS) -> int:
    """The number of adapter parameters `apply_lora` adds to a decoder of `config`."""
    if not rank:
        return 0
    d, f, kv = config.d_model, config.d_ff, config.n_kv_head * config.head_dim
    shapes = {
        "attn.qkv": (d, d + 2 * kv),
        "attn.proj": (d, d),
        "mlp.gate_up": (d, 2 * f),
        "mlp.proj": (f, d),
    }
    return config.n_layer * sum(rank * sum(shapes[t]) for t in targets)


@torch.no_grad()
def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A decoder state dict with each adapter folded into its weight (W + scale * B A with
    scale = lora_alpha / lora_rank, in fp32, then the weight's dtype) and the adapter entries
    gone."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in state:
        if key.endswith(".lora_a"):
            prefix = key.removesuffix(".lora_a")
            a, b = state[key].float(), state[f"{prefix}.lora_b"].float()
            weight = state[f"{prefix}.weight"]
            merged[f"{prefix}.weight"] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with its adapters merged: the plain decoder's state dict (what
    `save_tinyrecipe_checkpoint` takes), unchanged for a model without adapters."""
    scales = {m.scale for m in model.modules() if isinstance(m, LoRALinear)}
    state = model.state_dict()
    return merge_lora(state, scales.pop()) if scales else state

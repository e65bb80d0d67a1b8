"""Causal attention kernels: FlashAttention-2 when it can run, PyTorch SDPA everywhere else.

flash-attn is imported lazily, on the first call that could use it, never at module import.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


_FLASH: list = []  # [flash_attn_func or None] once looked up


def load_flash_attn():
    """`flash_attn.flash_attn_func`, or None when flash-attn is not installed or fails to import.
    Looked up once, eagerly: `compile_blocks` calls this before compiling, so a compiled graph
    reads the cached answer instead of tracing an import."""
    if not _FLASH:
        try:
            from flash_attn import flash_attn_func
        except Exception as err:  # ImportError, or a CUDA/ABI mismatch raised at import
            log.info("flash-attn unavailable (%s); using torch SDPA", err)
            flash_attn_func = None
        _FLASH.append(flash_attn_func)
    return _FLASH[0]


def flash_supported(q: torch.Tensor) -> bool:
    """True when FlashAttention-2 can take `q`: a CUDA fp16/bf16 tensor and flash-attn importable."""
    return (
        q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and load_flash_attn() is not None
    )


def select_backend(q: torch.Tensor, requested: str = "auto") -> str:
    """The kernel `causal_attention` runs for `q`: "flash" or "sdpa"."""
    if requested == "sdpa":
        return "sdpa"
    if flash_supported(q):
        return "flash"
    if requested == "flash":
        raise RuntimeError(
            "attention='flash' needs flash-attn installed (pip install 'tinyrecipe[gpu]') and CUDA "
            f"fp16/bf16 tensors, got {q.device.type} {q.dtype}; set model attention to 'auto' or 'sdpa'"
        )
    return "sdpa"


_logged: set[str] = set()


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Causal self-attention. q: (B, T, H, D); k, v: (B, S, H_kv, D) with H % H_kv == 0 and
    S >= T: the T queries are the last T of the S positions (S > T when generating with a
    KV cache). Returns (B, T, H, D). Grouped KV heads are never copied out to H heads.
    """
    chosen = select_backend(q, backend)
    # Never a silent slow path: say once which kernel runs (not from inside a compiled graph).
    if chosen not in _logged and not torch.compiler.is_compiling():
        _logged.add(chosen)
        log.info("tinyrecipe: attention kernel %s (%s, %s)", chosen, q.device.type, q.dtype)
    if chosen == "flash":  # flash-attn aligns the causal mask to the last query itself
        return load_flash_attn()(q, k, v, causal=True)
    T, S = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = k.size(1) != q.size(1)
    if T == S:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif T == 1:  # one new token (decoding) sees every cached key: no mask, the fast kernels
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:  # query i sits at position S - T + i and sees keys 0 .. S - T + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)

"""Causal attention kernels, chosen by what is fastest on the device (`select_backend`):

* `fa3`: FlashAttention-3 (`flash_attn_interface`, Hopper) when it imports;
* `cudnn`: SDPA with its cuDNN kernel first (Hopper and later without FlashAttention-3: measured
  0.92 ms against 1.27 for FlashAttention-2 inside SDPA on an H200, `docs/performance.md`);
* `flash`: FlashAttention-2 (the `flash-attn` package) on Ampere/Ada when it imports;
* `sdpa`: PyTorch SDPA, its own dispatch (every other device, the CPU included); on the CPU,
  bf16 training at short sequences and small heads runs it in fp32 (`cpu_fp32_sdpa`).

`model.config.attention: auto` takes that order; a name forces one kernel (one line where it
cannot run). Kernel packages are imported lazily, on the first call that could use them.

With a `DocumentMask` (packed blocks of several documents), a token attends only to earlier
tokens of its own document. On a GPU a varlen kernel takes the documents as sequences
(`cu_seqlens`) and does no work across them: FlashAttention-3's or -2's when chosen, else
torch's own (`torch.nn.attention.varlen`); elsewhere SDPA with a block-diagonal causal mask.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)
# `cudnn`: SDPA tries its cuDNN kernel first, its others where cuDNN cannot take the call
CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


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


_FA3: list = []  # [flash_attn_interface's (flash_attn_func, flash_attn_varlen_func) or None]


def load_fa3():
    """FlashAttention-3's `(flash_attn_func, flash_attn_varlen_func)` from `flash_attn_interface`
    (built from flash-attention's `hopper/`), or None where it does not import. Looked up once."""
    if not _FA3:
        try:
            from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
        except Exception as err:  # not installed, or built for another torch / GPU
            log.info("FlashAttention-3 unavailable (%s)", err)
            _FA3.append(None)
        else:
            _FA3.append((flash_attn_func, flash_attn_varlen_func))
    return _FA3[0]


def _gpu_half(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


_CAPABILITY: dict[int, tuple[int, int]] = {}  # CUDA device index -> compute capability


def gpu_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device, read once per device (`compile_blocks` reads it
    before compiling, so a compiled graph finds the cached answer)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def flash_supported(q: torch.Tensor) -> bool:
    """True when FlashAttention-2 can take `q`: a CUDA fp16/bf16 tensor and flash-attn importable."""
    return _gpu_half(q) and load_flash_attn() is not None


BACKENDS = ("auto", "sdpa", "cudnn", "flash", "fa3")
_INSTALL = {
    "flash": "flash-attn (pip install 'tinyrecipe[gpu]')",
    "fa3": "FlashAttention-3's flash_attn_interface (built from flash-attention's hopper/)",
}


def select_backend(q: torch.Tensor, requested: str = "auto") -> str:
    """The kernel `causal_attention` runs for `q`: "fa3", "cudnn", "flash" or "sdpa". `auto`: on
    a CUDA fp16/bf16 tensor, FlashAttention-3 on Hopper (9.x) when it imports, else SDPA's cuDNN
    kernel on Hopper and later, FlashAttention-2 on Ampere/Ada (8.x) when it imports; SDPA
    elsewhere. A forced kernel that cannot run is one line."""
    if requested == "sdpa":
        return "sdpa"
    half = _gpu_half(q)
    if requested == "auto":
        if not half:
            return "sdpa"
        major = gpu_capability(q.device)[0]
        if major == 9 and load_fa3() is not None:
            return "fa3"
        if major >= 9:
            return "cudnn"
        return "flash" if major == 8 and load_flash_attn() is not None else "sdpa"
    ready = {
        "flash": lambda: load_flash_attn() is not None,
        "fa3": lambda: load_fa3() is not None,
        "cudnn": torch.backends.cudnn.is_available,
    }[requested]
    if half and ready():
        return requested
    needs = _INSTALL.get(requested, "cuDNN")
    raise RuntimeError(
        f"attention={requested!r} needs {needs} and CUDA fp16/bf16 tensors, got {q.device.type} "
        f"{q.dtype}; set model.config.attention to 'auto' or 'sdpa'"
    )


_VARLEN: list = []  # [torch's varlen attention adapted to (q, k, v, cu_seqlens, max_len), or None]


def load_torch_varlen():
    """torch's `varlen_attn` (CUDA only) as `f(q, k, v, cu_seqlens, max_seqlen)` -> causal
    attention of each sequence, or None when this torch has none. Its signature has changed
    between torch releases: causal is `is_causal=True` in the first, `window_size=(-1, 0)`
    since, and grouped KV heads need `enable_gqa=True` where that argument exists."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except Exception:  # ImportError before torch 2.10, or a build without it
            _VARLEN.append(None)
            return None
        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:
            causal = {"window_size": (-1, 0)}
        elif "is_causal" in params:
            causal = {"is_causal": True}
        else:  # a signature this code does not know: SDPA instead of guessing
            _VARLEN.append(None)
            return None
        gqa = "enable_gqa" in params

        def varlen(q, k, v, cu, max_seqlen):
            extra = {"enable_gqa": True} if gqa and k.size(1) != q.size(1) else {}
            return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **causal, **extra)

        _VARLEN.append(varlen)
    return _VARLEN[0]


def document_backend(q: torch.Tensor, requested: str = "auto") -> str:
    """The kernel a document mask runs on for `q`: "fa3" or "flash" (their varlen kernels),
    "varlen" (torch's, on CUDA fp16/bf16 when `requested` is "auto" and neither package runs) or
    "sdpa" (a dense block-diagonal mask; "cudnn" too, where SDPA takes the mask)."""
    chosen = select_backend(q, requested)
    if chosen in ("sdpa", "cudnn") and requested == "auto" and _gpu_half(q) and load_torch_varlen():
        return "varlen"
    return chosen


@dataclass
class DocumentMask:
    """Where the documents of a packed batch are, built once per forward and shared by every
    block: `dense` (B, 1, T, T) bool, True where a query may attend a key (same document, not
    later), for SDPA; `cu_seqlens` (int32, the documents' starts in the flattened B x T tokens,
    then B x T) and `max_seqlen` for a varlen kernel (flash-attn's or torch's), made only when
    one will run."""

    documents: torch.Tensor
    dense: torch.Tensor | None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @staticmethod
    def from_documents(documents: torch.Tensor, varlen: bool = False) -> DocumentMask:
        """`documents` (B, T): each token's document id, non-decreasing along a row; `varlen`:
        the documents as sequences for a varlen kernel instead of SDPA's dense mask."""
        B, T = documents.shape
        if varlen:
            flat = documents + torch.arange(B, device=documents.device)[:, None] * (T + 1)
            flat = flat.flatten()
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            cu = torch.nonzero(starts).flatten().to(torch.int32)  # one host sync per forward
            cu = torch.cat([cu, cu.new_tensor([B * T])])
            return DocumentMask(documents, None, cu, T)  # T bounds every document's length
        return DocumentMask(documents, block_causal(documents))


def block_causal(documents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query t may attend key s when s <= t and both are in one document."""
    T = documents.size(1)
    same = documents[:, :, None] == documents[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (same & causal)[:, None]


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its own document (B, T): RoPE restarted per document."""
    B, T = documents.shape
    index = torch.arange(T, device=documents.device).expand(B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


_logged: set[str] = set()


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    documents: DocumentMask | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal self-attention. q: (B, T, H, D); k, v: (B, S, H_kv, D) with H % H_kv == 0 and
    S >= T: the T queries are the last T of the S positions (S > T when generating with a
    KV cache). Returns (B, T, H, D). Grouped KV heads are never copied out to H heads.
    `documents`: attend within each document only (training on packed blocks, S == T).
    `mask` (T, S) bool, True where a query sees a key, instead of that alignment (a static KV
    cache: S is the buffer, filled up to the queries); SDPA runs it.
    """
    if mask is not None:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        return masked_sdpa(q, k, v, mask).transpose(1, 2)
    chosen = select_backend(q, backend) if documents is None else document_backend(q, backend)
    fp32 = chosen == "sdpa" and documents is None and q.size(1) == k.size(1) and cpu_fp32_sdpa(q)
    # Never a silent slow path: say once which kernel runs (not from inside a compiled graph).
    said = chosen + (" with a document mask" if documents is not None else "")
    said += " in fp32 (bf16 training at this shape on the CPU)" if fp32 else ""
    if said not in _logged and not torch.compiler.is_compiling():
        _logged.add(said)
        log.info("tinyrecipe: attention kernel %s (%s, %s)", said, q.device.type, q.dtype)
    if documents is not None:
        return _document_attention(q, k, v, chosen, documents)
    if chosen == "flash":  # flash-attn aligns the causal mask to the last query itself
        return load_flash_attn()(q, k, v, causal=True)
    if chosen == "fa3":
        return _first(load_fa3()[0](q, k, v, causal=True))
    T, S = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = k.size(1) != q.size(1)
    with sdpa_kernel(CUDNN_FIRST, set_priority=True) if chosen == "cudnn" else nullcontext():
        if fp32:
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), is_causal=True, enable_gqa=gqa
                ).to(q.dtype)
        elif T == S:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:  # one new token (decoding) sees every cached key: no mask, the fast kernels
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # query i sits at position S - T + i and sees keys 0 .. S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
            y = masked_sdpa(q, k, v, mask)
    return y.transpose(1, 2)


def cpu_fp32_sdpa(q: torch.Tensor) -> bool:
    """Whether causal SDPA on `q` (B, T, H, D) runs in fp32: for training (`q` needs gradients)
    where `trains_attention_in_fp32` says so."""
    return (
        q.requires_grad
        and torch.is_grad_enabled()
        and trains_attention_in_fp32(q.device.type, q.dtype, q.size(1), q.size(3))
    )


def trains_attention_in_fp32(device_type: str, dtype: torch.dtype, seq_len: int, head_dim: int):
    """Whether training attention in `dtype` runs in fp32: bf16 on the CPU at T < 768 and head
    size <= 32. There the CPU flash kernel works in small query blocks and its bf16 backward is
    slower than its fp32 one (8 x 256 tokens, 8 heads of 32: 33 ms forward and backward against
    22, docs/performance.md); at longer sequences or larger heads, and without gradients, the
    bf16 kernel is the faster. The run line and the memory estimate ask it too."""
    return device_type == "cpu" and dtype == torch.bfloat16 and seq_len < 768 and head_dim <= 32


def _first(out):
    """FlashAttention-3 returns the output alone or (output, log-sum-exp) by release."""
    return out[0] if isinstance(out, tuple) else out


def _document_attention(q, k, v, chosen: str, documents: DocumentMask) -> torch.Tensor:
    B, T, H, D = q.shape
    if chosen in ("fa3", "flash", "varlen") and documents.cu_seqlens is not None:
        cu, n = documents.cu_seqlens, documents.max_seqlen
        flat = (q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D))
        if chosen == "fa3":
            y = _first(load_fa3()[1](*flat, cu, cu, n, n, causal=True))
        elif chosen == "flash":
            from flash_attn import flash_attn_varlen_func

            y = flash_attn_varlen_func(*flat, cu, cu, n, n, causal=True)
        else:
            y = load_torch_varlen()(*flat, cu, n)
        return y.view(B, T, H, D)
    # the mask was made for the kernel expected; another one (a dtype that autocast changed)
    # still gets a correct mask
    mask = documents.dense if documents.dense is not None else block_causal(documents.documents)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    return masked_sdpa(q, k, v, mask).transpose(1, 2)


def masked_sdpa(q, k, v, mask: torch.Tensor, ungroup: bool | None = None) -> torch.Tensor:
    """SDPA of (B, H, T, D) q against (B, H_kv, S, D) k, v under a boolean `mask`, (T, S) or
    broadcasting to (B, 1, T, S). On CUDA no kernel takes both a mask and grouped KV heads
    (SDPA then runs its math kernel, which copies K and V out to H heads and keeps the
    (B, H, T, S) scores), so there (`ungroup` None: on CUDA) the groups are undone without it:
    a (T, S) mask, the same for every row (a KV cache's), folds each KV head's group of query
    heads into the query length (H_kv heads of G * T queries: no copy of the cache, which
    decoding reads once a token); a per-row mask (packed documents in training, T large)
    repeats the KV heads instead, where a G times larger mask would cost more. Either way the
    memory-efficient kernel takes the mask. Elsewhere SDPA groups the heads itself."""
    B, H, T, D = q.shape
    groups = H // k.size(1)
    if groups == 1 or not (q.is_cuda if ungroup is None else ungroup):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
    if mask.dim() == 2:  # query head h uses KV head h // groups: (B, H_kv, groups * T, D)
        folded = q.reshape(B, k.size(1), groups * T, D)
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(groups, 1))
        return y.reshape(B, H, T, D)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

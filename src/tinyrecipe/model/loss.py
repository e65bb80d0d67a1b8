"""Cross-entropy of the LM head without the full logits: `linear_cross_entropy`.

`Llama.forward` computes `F.cross_entropy(lm_head(h), targets)` — the readable reference. It
materialises (tokens × vocab) logits in fp32 and keeps them for backward: 1 GiB for one
TinyLlama micro-batch of 8 × 2048 tokens at vocab 32000, plus log_softmax's copy and the zero
filled gradient of the same size.

`linear_cross_entropy` (chosen by `ModelConfig.loss_chunk_size > 0`) walks the tokens in
chunks. For each chunk it computes the logits in fp32, the loss, and at once the gradient of
the loss with respect to the chunk's hidden states and the head's weight (softmax − one-hot,
scaled by 1/#targets); backward only scales the stored gradients by the incoming one. Peak
memory for the head drops from O(tokens × vocab) to O(chunk × vocab), and the separate
log_softmax / NLL backward passes disappear. The result equals
`F.cross_entropy(h @ W.T, targets, ignore_index=-100)` to float rounding (tested).

z-loss (PaLM; OLMo and nanotron use it): `z_loss` > 0 adds z_loss × mean(log Z)², log Z the
log-partition (logsumexp of the logits) of each target position, which keeps the logits from
drifting; its gradient 2 z_loss log Z × softmax joins the cross-entropy's in the same pass (a
per-row factor, no extra vocab-sized work).

What makes it fast (docs/performance.md): the softmax and its gradient are worked in place in
the chunk's logits (one buffer reused by every chunk where the kernel can write into it, no
log_softmax copy); the softmax stays unnormalised, exp(logit - row max), and in fp32 its
1/row-sum joins 1/#targets as a per-row scale on the small (chunk × d) side of the two
gradient matmuls, so the vocab-sized buffer sees one exp and no divide; on CPU in fp32 the
logits run on oneDNN's linear kernel; no host sync (`.item()`). In bf16/fp16 (the GPU path) the
chunk's softmax work is a handful of memory-bound passes over (chunk × vocab) values; with
`compiled=True` (`model.speed.compile: true`) inductor fuses them into a few kernels that read
the low-precision logits and write the low-precision gradient, never an fp32 copy (the same
function, `_chunk_softmax`, eager or compiled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _onednn_logits(h: torch.Tensor) -> bool:
    """Whether the head's logits for `h` run on oneDNN's linear kernel: CPU fp32, when present.

    oneDNN's linear is the kernel inductor emits for CPU linears; for the head's shape (K = d
    small, a vocab-wide output) it is faster than MKL's sgemm behind `torch.mm`
    (docs/performance.md). Inside a compiled graph inductor picks the kernel.
    """
    return (
        h.device.type == "cpu"
        and h.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and not torch.compiler.is_compiling()  # inductor lowers this op only for its own use
    )


_COMPILED_CHUNK = None


def _chunk_softmax(logits, targets, valid, z_loss: float, want_grad: bool):
    """One chunk: (sum of -log softmax[target], sum of z_loss x log Z², gradient, row scale).

    `logits` (n, V), `targets` (n, 1) (ignored rows set to 0), `valid` (n, 1) bool. The
    gradient of the loss with respect to the logits, per row c / sum x exp(logit - max) -
    one_hot, c = 1 + 2 z_loss log Z (1 without z-loss), 0 for ignored rows, comes in one of two
    forms. fp32 logits are worked in place and stay unnormalised: the buffer holds exp(logit -
    max) - sum / c x one_hot and the row scale valid x c / sum goes on the small side of the
    gradient matmuls. bf16/fp16 logits are read into fp32 and the gradient is returned
    normalised in their dtype (row scale None), its target entries worked in fp32 first (they
    are differences of numbers near 1)."""
    e = logits if logits.dtype == torch.float32 else logits.float()
    rows_max = e.amax(dim=1, keepdim=True)
    target_logit = e.gather(1, targets)
    e.sub_(rows_max).exp_()  # softmax, unnormalised: exp(logit - row max)
    sums = e.sum(dim=1, keepdim=True)
    log_z = sums.log() + rows_max  # log-partition of each row
    loss = ((log_z - target_logit) * valid).sum()  # -log softmax[target] = log Z - logit[target]
    z = (log_z.square() * valid).sum() * z_loss if z_loss else None
    if not want_grad:
        return loss, z, None, None
    c = 1.0 + 2.0 * z_loss * log_z if z_loss else 1.0
    row_scale = valid * c / sums  # (n, 1); 0 for ignored rows
    if logits.dtype == torch.float32:
        e.scatter_add_(1, targets, -sums / c)
        return loss, z, e, row_scale
    target_grad = (target_logit - rows_max).exp() * row_scale - valid.float()
    g = e.mul_(row_scale).to(logits.dtype)
    g.scatter_(1, targets, target_grad.to(logits.dtype))
    return loss, z, g, None


def _chunk_kernel(compiled: bool):
    """`_chunk_softmax`, compiled by inductor (once per process) when asked and not already
    inside a compiled graph."""
    global _COMPILED_CHUNK
    if not compiled or torch.compiler.is_compiling():
        return _chunk_softmax
    if _COMPILED_CHUNK is None:
        _COMPILED_CHUNK = torch.compile(_chunk_softmax, dynamic=False, fullgraph=True)
    return _COMPILED_CHUNK


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, grad_enabled, z_loss, compiled):
        # h (N, d), weight (V, d), targets (N,); autograd runs forward with grad mode off, so
        # the caller says whether gradients are wanted at all (no work for them in evaluation).
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        fp32 = h.dtype == torch.float32
        # 1 / #targets as a tensor: no host sync (a GPU keeps running ahead)
        scale = 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).float()
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        z_total = torch.zeros((), dtype=torch.float32, device=h.device)
        # fp32: one logits buffer, reused by every chunk, the only vocab-sized tensor (fresh
        # tensors of this size cost page faults on CPU, chunk after chunk); oneDNN writes a new
        # tensor instead, but is the faster kernel on CPU. bf16/fp16: the matmul's own output.
        onednn = _onednn_logits(h)
        rows = min(chunk_size, h.size(0))
        buf = h.new_empty(rows, w.size(0)) if fp32 and not onednn else None
        kernel = _chunk_kernel(compiled and not fp32)
        for start in range(0, h.size(0), chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            if onednn:
                logits = torch.ops.mkldnn._linear_pointwise(hc, w, None, "none", [], None)
            elif fp32:
                logits = torch.mm(hc, w.T, out=buf[: hc.size(0)])
            else:
                logits = hc @ w.T
            valid = tc != IGNORE_INDEX
            loss, z, g, row_scale = kernel(
                logits, tc.masked_fill(~valid, 0)[:, None], valid[:, None], z_loss, want_h or want_w
            )
            del logits  # before the next chunk's logits exist
            total += loss
            if z is not None:
                z_total += z
            if g is None:
                continue
            gh = grad_h[start : start + chunk_size] if want_h else None
            if fp32:  # 1/sum and 1/#targets scale the small (n, d) side of the matmuls
                row_scale = row_scale * scale
                if want_h:
                    torch.mm(g, w, out=gh).mul_(row_scale)
                if want_w:
                    grad_w.addmm_(g.T, hc * row_scale)
            else:  # bf16/fp16 matmul inputs, normalised by the kernel, so they stay O(1)
                if want_h:
                    torch.mm(g, w, out=gh).mul_(scale)
                if want_w:
                    grad_w += (g.T @ hc).float()
            del g
        if want_w and not fp32:
            grad_w.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        z_term = z_total * scale
        ctx.mark_non_differentiable(z_term)
        return (total + z_total) * scale, z_term

    @staticmethod
    def backward(ctx, grad_out, _grad_z_term):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    z_loss: float = 0.0,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` (h: (..., d), weight: (V, d)) against `targets`
    (same leading shape; -100 ignored), `chunk_size` tokens at a time, plus `z_loss` x the
    mean squared log-partition. No targets: 0. `compiled`: the bf16/fp16 softmax work of each
    chunk as inductor's fused kernels."""
    return linear_cross_entropy_z(h, weight, targets, chunk_size, z_loss, compiled)[0]


def linear_cross_entropy_z(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    z_loss: float = 0.0,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, its z-loss part, detached): `linear_cross_entropy` and what z-loss added."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):  # the head's matmuls in the autocast dtype, as
        h = h.to(torch.get_autocast_dtype(device_type))  # nn.Linear would run them
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            h.reshape(-1, h.size(-1)),
            weight,
            targets.reshape(-1),
            chunk_size,
            torch.is_grad_enabled(),
            float(z_loss),
            compiled,
        )


def cross_entropy_z(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable reference: (mean cross-entropy + z_loss x mean (log Z)², the z part
    detached) of full (..., V) logits, positions whose target is -100 left out."""
    logits, targets = logits.flatten(0, -2).float(), targets.flatten()
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)  # no target (an SFT prompt-only block): 0, not NaN
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / count
    if not z_loss:
        return loss, torch.zeros((), device=logits.device)
    z_term = z_loss * (logits.logsumexp(-1).square() * valid).sum() / count
    return loss + z_term, z_term.detach()

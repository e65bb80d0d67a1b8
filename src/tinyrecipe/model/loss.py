"""Cross-entropy of the LM head without the full logits: `linear_cross_entropy`.

`Llama.forward` computes `F.cross_entropy(lm_head(h), targets)` — the readable reference. It
materialises (tokens × vocab) logits in fp32 and keeps them for backward: 1 GiB for one
TinyLlama micro-batch of 8 × 2048 tokens at vocab 32000, plus log_softmax's copy and the zero
filled gradient of the same size.

`linear_cross_entropy` (chosen by `ModelConfig.loss_chunk_size > 0`) walks the tokens in
chunks. For each chunk it computes the logits in fp32, the loss, and at once the gradient of
the loss with respect to the chunk's hidden states and the head's weight (softmax − one-hot,
scaled by 1/#targets); the logits are freed before the next chunk. Backward only scales the
stored gradients by the incoming one. Peak memory for the head drops from O(tokens × vocab)
to O(chunk × vocab), and the separate log_softmax / NLL backward passes disappear. The result
equals `F.cross_entropy(h @ W.T, targets, ignore_index=-100)` to float rounding (tested).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, grad_enabled):
        # h (N, d), weight (V, d), targets (N,); autograd runs forward with grad mode off, so
        # the caller says whether gradients are wanted at all (no work for them in evaluation).
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        n_targets = (targets != IGNORE_INDEX).sum().clamp(min=1)
        scale = 1.0 / n_targets.item()
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = (hc @ w.T).float()  # (n, V), the only vocab-sized tensor, freed per chunk
            valid = tc != IGNORE_INDEX
            tc = tc.masked_fill(~valid, 0)
            rows = torch.arange(tc.size(0), device=tc.device)
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass, no separate logsumexp
            del logits
            total -= (logp[rows, tc] * valid).sum()
            if not (want_h or want_w):
                continue
            grad = logp.exp_()  # softmax, in place: d(loss)/d(logits) = softmax - one_hot
            grad[rows, tc] -= 1.0
            if not bool(valid.all()):
                grad.mul_(valid[:, None])
            grad = grad.to(h.dtype)
            if want_h:  # the 1/n_targets scale is applied to the small (n, d) result
                torch.mm(grad, w, out=grad_h[start : start + chunk_size]).mul_(scale)
            if want_w:
                if h.dtype == torch.float32:
                    grad_w.addmm_(grad.T, hc)
                else:
                    grad_w += (grad.T @ hc).float()
        if want_w:
            grad_w.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` (h: (..., d), weight: (V, d)) against `targets`
    (same leading shape; -100 ignored), `chunk_size` tokens at a time. No targets: 0."""
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
        )

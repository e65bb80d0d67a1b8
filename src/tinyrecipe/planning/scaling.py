"""Compute planning: Chinchilla-optimal and inference-aware (Sardana & Frankle, arXiv 2401.00448).

Loss model: L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D training tokens).
Training costs 6·N·D FLOPs, inference 2·N FLOPs per token served. For a target loss the
inference-aware optimum minimises

    w_train · 6·N·D_train(N) + w_inf · 2·N·D_inference,   D_train(N) = (B / (ℓ - E - A/N^α))^(1/β)

over N > N_min = (A / (ℓ - E))^(1/α) (below that no amount of data reaches ℓ). With weights 1
the objective is FLOPs; the cost version divides each term by its MFU and peak and multiplies by
a price. The derivative in N is negative near N_min and positive for large N, so the optimum
is its unique root, found by bisection on log N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LossFit:
    """Constants of L(N, D) = E + A/N^alpha + B/D^beta. Default: the Chinchilla fit as
    Sardana & Frankle use it (Hoffmann et al. 2022, approach 3)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.336
    beta: float = 0.283

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def tokens_for_loss(self, n_params: float, target_loss: float) -> float:
        """Training tokens a model of n_params needs to reach target_loss (inf if it cannot)."""
        gap = target_loss - self.E - self.A / n_params**self.alpha
        return math.inf if gap <= 0 else (self.B / gap) ** (1 / self.beta)

    def min_params(self, target_loss: float) -> float:
        """The size below which target_loss is out of reach with any amount of data."""
        self.check_reachable(target_loss)
        return (self.A / (target_loss - self.E)) ** (1 / self.alpha)

    def check_reachable(self, target_loss: float) -> None:
        if target_loss <= self.E:
            raise ValueError(
                f"target loss {target_loss} is unreachable: the fit's irreducible loss E is "
                f"{self.E}; choose a target above it"
            )


CHINCHILLA = LossFit()


@dataclass(frozen=True)
class Plan:
    """A model size and training length, with the FLOPs they cost."""

    n_params: float
    train_tokens: float
    inference_tokens: float
    loss: float

    @property
    def train_flops(self) -> float:
        return 6 * self.n_params * self.train_tokens

    @property
    def inference_flops(self) -> float:
        return 2 * self.n_params * self.inference_tokens

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> float:
        return self.train_tokens / self.n_params


def chinchilla_optimal(compute_flops: float, fit: LossFit = CHINCHILLA) -> Plan:
    """The N, D minimising loss for a training budget C = 6·N·D (closed form)."""
    a, b = fit.alpha, fit.beta
    g = (a * fit.A / (b * fit.B)) ** (1 / (a + b))
    n = g * (compute_flops / 6) ** (b / (a + b))
    d = compute_flops / (6 * n)
    return Plan(n, d, 0.0, fit.loss(n, d))


def chinchilla_tokens(n_params: float, fit: LossFit = CHINCHILLA) -> float:
    """The training tokens that make n_params Chinchilla-optimal (alpha·A/N^alpha = beta·B/D^beta)."""
    return (fit.beta * fit.B * n_params**fit.alpha / (fit.alpha * fit.A)) ** (1 / fit.beta)


def chinchilla_loss(n_params: float, fit: LossFit = CHINCHILLA) -> float:
    """The loss of a Chinchilla-optimal model of n_params."""
    return fit.loss(n_params, chinchilla_tokens(n_params, fit))


def inference_optimal(
    target_loss: float,
    inference_tokens: float = 0.0,
    fit: LossFit = CHINCHILLA,
    train_weight: float = 1.0,
    inference_weight: float = 1.0,
) -> Plan:
    """The N, D_train reaching target_loss with least train_weight·6ND + inference_weight·2N·D_inf.

    With the default weights the objective is FLOPs; `cost_optimal` sets them to $ per FLOP.
    """
    if inference_tokens < 0:
        raise ValueError(f"inference_tokens={inference_tokens} must be >= 0")
    n_min = fit.min_params(target_loss)

    def slope(log_n: float) -> float:  # d(objective)/dN, up to a positive factor
        n = math.exp(log_n)
        gap = target_loss - fit.E - fit.A / n**fit.alpha
        d = (fit.B / gap) ** (1 / fit.beta)
        return 6 * train_weight * d * (1 - fit.alpha * fit.A / n**fit.alpha / (fit.beta * gap)) + (
            2 * inference_weight * inference_tokens
        )

    lo, hi = math.log(n_min) + 1e-12, math.log(n_min) + 1.0
    while slope(hi) < 0:  # widen until the slope turns positive
        hi += 1.0
        if hi - lo > 200:
            raise RuntimeError("inference-aware optimum not bracketed; check the fit constants")
    while slope(lo) > 0:  # numerically right at n_min: step inwards
        lo = (lo + hi) / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    n = math.exp((lo + hi) / 2)
    d = fit.tokens_for_loss(n, target_loss)
    return Plan(n, d, inference_tokens, fit.loss(n, d))


@dataclass(frozen=True)
class CostModel:
    """Dollars for FLOPs: price per GPU-hour, the GPU's peak FLOP/s and the MFU reached in
    training, in inference prefill (input tokens) and in decoding (output tokens)."""

    price_per_gpu_hour: float
    peak_flops: float
    mfu_train: float = 0.5
    mfu_input: float = 0.5
    mfu_output: float = 0.05

    def dollars_per_flop(self, mfu: float) -> float:
        return self.price_per_gpu_hour / 3600 / (self.peak_flops * mfu)


def cost_optimal(
    target_loss: float,
    input_tokens: float,
    output_tokens: float,
    cost: CostModel,
    fit: LossFit = CHINCHILLA,
) -> tuple[Plan, float]:
    """The plan of least dollars reaching target_loss, and its dollars."""
    total = input_tokens + output_tokens
    train_w = cost.dollars_per_flop(cost.mfu_train)
    if total > 0:
        inf_w = (
            input_tokens * cost.dollars_per_flop(cost.mfu_input)
            + output_tokens * cost.dollars_per_flop(cost.mfu_output)
        ) / total
    else:
        inf_w = 0.0
    plan = inference_optimal(target_loss, total, fit, train_weight=train_w, inference_weight=inf_w)
    return plan, train_w * plan.train_flops + inf_w * plan.inference_flops


def implied_inference_tokens(
    n_params: float, train_tokens: float, fit: LossFit = CHINCHILLA
) -> float:
    """The lifetime inference demand at which (n_params, train_tokens) is the FLOP-optimal way to
    reach its own loss: where the objective's slope in N is zero. Raises if the pair trains on
    less than Chinchilla-optimal data (no inference demand makes that optimal)."""
    ratio = fit.alpha * fit.A / n_params**fit.alpha / (fit.beta * fit.B / train_tokens**fit.beta)
    if ratio < 1:
        raise ValueError(
            f"{n_params:.3g} parameters on {train_tokens:.3g} tokens is under-trained for this fit; "
            "no inference demand makes it FLOP-optimal"
        )
    return 3 * train_tokens * (ratio - 1)

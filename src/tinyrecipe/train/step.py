"""The training step and the evaluation sums, shared by the Trainer path (`CausalLMModule`) and
the Fabric loop, so both train and measure identically.

A step is `micro_batch_loss` on each micro-batch (backward by the caller), then `finish_step`:

* the gradient norm from each rank's local gradient shards and the step's mean loss, reduced
  together in **one** scalar all-reduce (torchtitan's way: no full gradient is ever gathered);
* clipping to `max_norm` by that norm;
* a non-finite loss or gradient marks the step bad on the device, and the fused AdamW kernel
  skips a bad step on the device too (`found_inf`, the mechanism `GradScaler` uses), so the
  weights never take a NaN and no host sync is needed to decide;
* optionally a loss spike too (`SpikeSkipper`: the loss or the gradient norm above the recent
  window's mean + sigma x std), decided on the device from the reduced values, so every rank
  agrees;
* the host learns of a bad step one step later (`NonFiniteGuard`, a copy that has long finished
  by then), to stop the run or count the skip.

Nothing here blocks the host on the device, and nothing but the one all-reduce (and the
sharding's own gradient reduce-scatter) talks to other ranks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinyrecipe.model.llama import Llama, LMOutput
from tinyrecipe.model.loss import IGNORE_INDEX

NONFINITE_POLICIES = ("stop", "skip")


def forward_batch(model: Llama, batch: dict[str, torch.Tensor]) -> LMOutput:
    """The model's output on one batch: a dict of `input_ids` and `labels` (B, T), labels
    IGNORE_INDEX where no loss is taken (the one batch type of pretraining, SFT and validation).
    A batch with `documents` (data.document_mask) attends within each document only."""
    return model(batch["input_ids"], batch["labels"], documents=batch.get("documents"))


def micro_batch_loss(model: Llama, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of one batch (with the z-loss when `ModelConfig.z_loss` is set)."""
    return forward_batch(model, batch).loss


def step_loss(
    model, batch: dict[str, torch.Tensor], per_token: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What one micro-batch adds to its step, for either loop: (the loss to back-propagate, its
    z-loss part, its target tokens). The mean loss; `per_token`: the loss and z-loss summed over
    the target tokens, which `finish_step(tokens=...)` then divides by the step's. `model` may
    be a wrapper (Fabric's)."""
    _, loss, z = forward_batch(model, batch)
    if not per_token:
        return loss, z, None
    n = target_tokens(batch)
    return loss * n, (z * n if z is not None else None), n


def target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The number of positions of a batch whose loss is taken (labels not IGNORE_INDEX)."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def per_token_loss(datamodule) -> bool:
    """Whether a DataModule's batches hold varying numbers of target tokens (its
    `targets_vary`: SFT's prompts and padding), so a step's loss is normalised per target token
    over the whole step (`finish_step(tokens=...)`). Pretraining's full blocks keep the mean over
    micro-batches (the same value there, and bitwise the reference run's)."""
    return bool(getattr(datamodule, "targets_vary", False))


class SpikeSkipper:
    """Skips an optimizer step whose loss or gradient norm exceeds the mean + `sigma` x std of
    the last `window` accepted steps (OLMo-core's loss-spike skipping). The window lives on the
    device and is updated without a host sync; it only judges once full. Its state goes into
    checkpoints (`state_dict`), so a resumed run decides as the uninterrupted one would."""

    def __init__(self, sigma: float, window: int = 128) -> None:
        if sigma <= 0 or window < 2:
            raise ValueError(
                f"model.guard.spike_sigma={sigma} must be > 0 and model.guard.spike_window={window} >= 2"
            )
        self.sigma, self.window = float(sigma), int(window)
        self.values: torch.Tensor | None = None  # (window, 2): loss, grad norm
        self.seen: torch.Tensor | None = None  # accepted steps so far (int64)

    def _ready(self, device: torch.device) -> None:
        if self.values is None or self.values.device != device:
            values, seen = self.values, self.seen
            self.values = torch.zeros(self.window, 2, device=device)
            self.seen = torch.zeros((), dtype=torch.int64, device=device)
            if values is not None:
                self.values.copy_(values)
                self.seen.copy_(seen)

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """1.0 when this step is a spike (never for a step already `bad`); accepted steps enter
        the window."""
        self._ready(loss.device)
        current = torch.stack([loss.float(), grad_norm.float()])
        mean = self.values.mean(0)
        std = self.values.std(0)
        full = self.seen >= self.window
        spike = (full & (current > mean + self.sigma * std).any() & (bad == 0)).float()
        accept = (spike == 0) & (bad == 0)
        slot = (self.seen % self.window).view(1, 1).expand(1, 2)
        old = self.values.gather(0, slot)
        self.values.scatter_(0, slot, torch.where(accept, current.view(1, 2), old))
        self.seen += accept.long()
        return spike

    def state_dict(self) -> dict:
        if self.values is None:
            return {"values": [], "seen": 0}
        return {"values": self.values.cpu().tolist(), "seen": int(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("values"):
            self.values = torch.tensor(state["values"], dtype=torch.float32)
            self.seen = torch.tensor(int(state["seen"]), dtype=torch.int64)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local_sq_norm(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """This rank's share of the squared gradient norm, so that the sum over all ranks is the full
    squared norm: each gradient's local squares are divided by the number of ranks that hold the
    same values (every rank for a gradient held whole, as on one device or under DDP; world / S
    for an FSDP2 DTensor sharded S ways). One fused multi-tensor norm per sharding layout."""
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        replicas = world
        if hasattr(g, "to_local"):  # a DTensor: its local shard, and how many ranks share it
            shards = 1
            for size, placement in zip(g.device_mesh.shape, g.placements, strict=True):
                if placement.is_shard():
                    shards *= size
            replicas = world // shards
            g = g.to_local()
        by_replicas.setdefault(replicas, []).append(g)
    total = None
    for replicas, group in by_replicas.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        sq = torch.stack(norms).square().sum() / replicas
        total = sq if total is None else total + sq
    return total


@dataclass
class StepStats:
    """Device tensors of one optimizer step (read them only when logging)."""

    loss: torch.Tensor  # mean over micro-batches and ranks
    grad_norm: torch.Tensor  # before clipping
    nonfinite: torch.Tensor  # 1.0 when the loss or a gradient was NaN/inf (the step is skipped)
    spike: torch.Tensor | None = None  # 1.0 when SpikeSkipper skipped the step
    z_loss: torch.Tensor | None = None  # the z-loss part of `loss`


@torch.no_grad()
def finish_step(
    params: list[torch.nn.Parameter],
    loss_sum: torch.Tensor,
    micro_batches: int,
    *,
    max_norm: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    z_sum: torch.Tensor | None = None,
    spikes: SpikeSkipper | None = None,
    tokens: torch.Tensor | None = None,
) -> StepStats:
    """After the last backward of a step and before `optimizer.step()`: reduce the norm and the
    loss in one all-reduce, clip, and arm the optimizer to skip a non-finite step on the device.

    `loss_sum` is this rank's sum of the micro-batch losses (detached), `z_sum` of their z-loss
    parts (reduced in the same all-reduce); the step's loss is their mean over micro-batches and
    ranks. With `tokens` (this rank's target tokens in the step) the step is per token instead:
    each micro-batch's loss and backward were *sums* over its target tokens (`loss x
    target_tokens(batch)`; the loop and the strategy average their gradients over the
    `micro_batches` and the ranks, as for means), and the loss and the gradients become means over
    the whole step's target tokens, as one process with the whole batch would take them, however
    unequally the tokens fall across micro-batches and ranks (torchtitan's and OLMo-core's
    global-token normalisation). The token count rides in the same all-reduce.

    An optimizer without the fused kernel cannot skip on the device; then a bad step's gradients
    are dropped on the host (one device sync, only for that kernel)."""
    grads = [p.grad for p in params if p.grad is not None]
    world = _world_size()
    device = loss_sum.device
    sq = _local_sq_norm(grads, world) if grads else torch.zeros((), device=device)
    if tokens is None:
        count = torch.full((), float(micro_batches), device=device)  # a fill: no host copy
    else:
        count = tokens.float()
    values = [sq.to(device), loss_sum.float(), count]
    if z_sum is not None:
        values.append(z_sum.float())
    packed = torch.stack(values)
    if world > 1:
        dist.all_reduce(packed)
    grad_norm = packed[0].sqrt()
    loss = packed[1] / packed[2]
    rescale = None
    if tokens is not None:  # gradients of summed losses, averaged over micro-batches and ranks
        rescale = micro_batches * world / packed[2]
        grad_norm = grad_norm * rescale
    nonfinite = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss)).float()
    spike = spikes.judge(loss, grad_norm, nonfinite) if spikes is not None else None
    skip = nonfinite if spike is None else torch.maximum(nonfinite, spike)
    scale = None
    if max_norm is not None and max_norm > 0 and grads:
        scale = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
        scale = torch.where(nonfinite > 0, torch.ones_like(scale), scale)
    if rescale is not None:
        scale = rescale if scale is None else scale * rescale
    if scale is not None and grads:
        torch._foreach_mul_(grads, scale)
    if optimizer is not None:
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = skip  # the fused kernel skips the whole update on the device
        elif skip.item():
            for p in params:
                p.grad = None  # AdamW leaves a parameter without a gradient untouched
    z_loss = packed[3] / packed[2] if z_sum is not None else None
    return StepStats(
        loss=loss, grad_norm=grad_norm, nonfinite=nonfinite, spike=spike, z_loss=z_loss
    )


class NonFiniteGuard:
    """What the host does about skipped steps: "stop" raises (the weights and the last checkpoint
    are untouched: the bad update was skipped on the device), "skip" warns and counts.

    `record(stats, step)` copies the step's flag to the host without waiting; the flag is read at
    the next `record` (or `flush`), when the copy has long finished, so the device never waits."""

    def __init__(self, policy: str = "stop") -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"model.guard.nonfinite={policy!r} is unknown; use one of {', '.join(NONFINITE_POLICIES)}"
            )
        self.policy = policy
        self.skipped = 0
        self._pending: tuple[torch.Tensor, int, object] | None = None

    def record(self, stats: StepStats, step: int) -> None:
        self.flush()
        flag, loss = stats.nonfinite.detach(), stats.loss.detach()
        if flag.is_cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(torch.stack([flag, loss]), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = torch.stack([flag, loss]), None
        host._host_copy = True  # read a step later, when the copy has long finished
        self._pending = (host, step, event)

    def flush(self) -> None:
        """Act on the recorded step, if any (waits for its copy only if it has not finished)."""
        if self._pending is None:
            return
        host, step, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        flag, loss = host.tolist()
        if flag == 0:
            return
        if self.policy == "stop":
            raise FloatingPointError(
                f"training loss is {loss} at step {step} (the update was skipped; weights and "
                "checkpoints are intact); lower model.optimizer.lr or check the data, then resume from the "
                "last checkpoint (or set model.guard.nonfinite: skip to skip such steps)"
            )
        self.skipped += 1
        warnings.warn(
            f"training loss is {loss} at step {step}; that optimizer step was skipped "
            f"(model.guard.nonfinite: skip; {self.skipped} so far)",
            stacklevel=2,
        )


def val_sums(model: Llama, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[loss x target tokens, target tokens] of one batch: summed over batches (and ranks), the
    mean loss of a loader is per target token."""
    _, loss, z = forward_batch(model, batch)
    if z is not None:
        loss = loss - z  # validation reports the cross-entropy alone
    n = (batch["labels"] != IGNORE_INDEX).sum()
    total = torch.where(n > 0, loss.detach().float() * n, 0.0)  # an all-padding batch: 0, not NaN
    return torch.stack([total, n.float()])


def val_metrics(rows: list[tuple[str, float, float, float]]) -> dict[str, float]:
    """val/loss/<name> and val/ppl/<name> per loader from (name, weight, loss sum, tokens), and
    val/loss, val/ppl of the mixture (weighted as in training). Loaders without tokens are left
    out."""
    metrics, mixed, total_weight = {}, 0.0, 0.0
    for name, weight, loss_sum, tokens in rows:
        if tokens == 0:  # no batch of this loader on any rank
            continue
        loss = loss_sum / tokens
        metrics[f"val/loss/{name}"], metrics[f"val/ppl/{name}"] = loss, math.exp(loss)
        mixed, total_weight = mixed + weight * loss, total_weight + weight
    if total_weight:
        metrics["val/loss"] = mixed / total_weight
        metrics["val/ppl"] = math.exp(mixed / total_weight)
    return metrics

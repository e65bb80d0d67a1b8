"""`CausalLMModule`: the LightningModule that trains the decoder. Thin by design: the model,
optimizer, schedule and FLOPs live in their own modules; strategy and precision are Trainer
arguments chosen by the recipe."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from tinyrecipe.faults import failpoint
from tinyrecipe.flops import forward_flops_per_token, train_flops_per_token
from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.model.config import SHAPE_FIELDS
from tinyrecipe.optim import build_adamw, warmup_cosine_lr


def _shape_diff(theirs: ModelConfig, ours: ModelConfig) -> str:
    """'n_layer 2 vs 3, ...' over the shape fields that differ; '' when the weights fit."""
    return ", ".join(
        f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}"
        for k in SHAPE_FIELDS
        if getattr(theirs, k) != getattr(ours, k)
    )


def val_sums(model: Llama, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[loss x target tokens, target tokens] of one batch: summed over batches (and ranks), the
    mean loss of a loader is per target token."""
    _, loss = model(inputs, targets)
    n = (targets != -100).sum()
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


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting ("bf16-mixed" -> bfloat16, ...)."""
    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


class CausalLMModule(L.LightningModule):
    """Next-token pretraining of a `Llama` built from a preset plus field overrides.

    Args:
        preset: a `ModelConfig` preset name ("tiny", "tinyllama-1.1b", ...).
        config: `ModelConfig` fields replacing the preset's (e.g. {"vocab_size": 8192}).
        lr, min_lr, warmup_steps, max_steps: the warmup + cosine schedule, in optimizer steps
            (max_steps None: the Trainer's max_steps).
        betas, eps, weight_decay: AdamW.
        decay_norms_and_embeddings: True decays every parameter (TinyLlama); False exempts
            norms and embeddings.
        meta_init: build on the meta device and materialise already sharded (large models).
        activation_checkpointing: recompute each block's activations in backward.
        compile: `torch.compile` each decoder block (torchtitan's way: short compile, one graph
            reused by every layer). Speed switches are all off or "auto" by default; the
            chunked loss is `config: {loss_chunk_size: N}`.
        optimizer_kernel: AdamW's kernel: "auto" (fused), "fused", "foreach" or "for-loop".
        nonfinite_loss: a NaN/inf training loss "stop"s the run with the step in the message
            (the last checkpoint is intact), or is "skip"ped: no update from that batch, a
            warning, and train/skipped_batches counts them.
        init_from: a tinyrecipe checkpoint (e.g. from `tinyrecipe convert from-hf`) whose
            weights the model starts from; its shape must match preset + config.
    """

    def __init__(
        self,
        preset: str = "tiny",
        config: dict[str, Any] | None = None,
        lr: float = 4e-4,
        min_lr: float = 4e-5,
        warmup_steps: int = 2000,
        max_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay_norms_and_embeddings: bool = True,
        meta_init: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        compile: bool = False,
        optimizer_kernel: str = "auto",
        nonfinite_loss: str = "stop",
    ) -> None:
        super().__init__()
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(
                f"model.nonfinite_loss={nonfinite_loss!r} is unknown; use 'stop' or 'skip'"
            )
        self._skipped = 0
        self.save_hyperparameters()
        self.config = ModelConfig.from_name(preset, **(config or {}))
        self.model: Llama | None = None
        self._val_sums: dict[int, torch.Tensor] = {}
        self._flops_per_batch = 0.0

    # -- model ---------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build (and, under FSDP2, shard) the decoder. Called by Lightning on every strategy."""
        if self.model is not None:
            return
        with torch.device("meta") if self.hparams.meta_init else nullcontext():
            model = Llama(self.config)
        if self.hparams.init_from:
            if self.hparams.meta_init:
                raise ValueError(
                    "model.init_from needs model.meta_init: false (weights load before sharding)"
                )
            from tinyrecipe.convert import load_tinyrecipe_checkpoint

            config, state = load_tinyrecipe_checkpoint(self.hparams.init_from)
            if detail := _shape_diff(config, self.config):
                raise ValueError(
                    f"model.init_from '{self.hparams.init_from}' holds a different model ({detail}, "
                    "checkpoint vs recipe); set model.preset/model.config to its shape"
                )
            model.load_state_dict(state)
        if self.hparams.activation_checkpointing:
            from tinyrecipe.strategies import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        if self.hparams.compile:
            from tinyrecipe.strategies import compile_blocks

            compile_blocks(model)
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:  # Lightning's ModelParallelStrategy: FSDP2 over the data-parallel dim
            from tinyrecipe.strategies import apply_fsdp2, bf16_mixed_policy

            policy = bf16_mixed_policy() if "bf16" in str(self.trainer.precision) else None
            apply_fsdp2(model, mesh["data_parallel"], mp_policy=policy)
        if self.hparams.meta_init:
            model.to_empty(device=self.trainer.strategy.root_device if self._trainer else "cpu")
            model.init_weights()
        self.model = model

    def on_fit_start(self) -> None:
        """Say which speed paths run (never a silent slow path)."""
        from tinyrecipe.model.attention import select_backend

        precision = str(self.trainer.precision)
        dtype = compute_dtype(precision)
        probe = torch.empty(0, device=self.trainer.strategy.root_device, dtype=dtype)
        hp, cfg = self.hparams, self.config
        rank_zero_info(
            f"tinyrecipe: {cfg.num_params() / 1e6:.1f}M params, "
            f"attention={select_backend(probe, cfg.attention)}, "
            f"compile={'per-block' if hp.compile else 'off'}, "
            f"activation_checkpointing={hp.activation_checkpointing}, "
            f"loss={f'chunked({cfg.loss_chunk_size})' if cfg.loss_chunk_size else 'plain'}, "
            f"adamw={hp.optimizer_kernel}, precision={precision}"
        )

    @property
    def flops_per_batch(self) -> float:
        """FLOPs of the last micro-batch, training or evaluation (read by the throughput monitor)."""
        return self._flops_per_batch

    def _count_flops(self, targets: torch.Tensor, training: bool) -> None:
        per_token = train_flops_per_token if training else forward_flops_per_token
        self._flops_per_batch = targets.numel() * per_token(self.config, targets.size(1))

    # -- steps ---------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None):
        """The decoder's forward (logits, or (logits, loss) with targets)."""
        return self.model(inputs, targets)

    @staticmethod
    def inputs_and_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pretraining batches are token blocks (B, T+1); SFT batches are dicts of input_ids and
        labels (B, T), -100 where no loss is taken."""
        if isinstance(batch, dict):
            return batch["input_ids"], batch["labels"]
        return batch[:, :-1], batch[:, 1:]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.inputs_and_targets(batch)
        self._count_flops(targets, training=True)
        _, loss = self.model(inputs, targets)
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:  # every rank must take the same branch
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() > 0:
            if self.hparams.nonfinite_loss == "skip":
                self._skipped += 1
                rank_zero_warn(
                    f"training loss is not finite at step {self.global_step} (batch {batch_idx}); "
                    f"skipping this batch (model.nonfinite_loss: skip; {self._skipped} so far)"
                )
                self.log("train/skipped_batches", float(self._skipped), reduce_fx="max")
                return None  # Lightning skips backward and the optimizer step
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}; lower model.lr or "
                "check the data, then resume from the last checkpoint (or set "
                "model.nonfinite_loss: skip to skip such batches)"
            )
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        tokens_seen = (
            (self.global_step + 1)
            * targets.numel()
            * self.trainer.world_size
            * self.trainer.accumulate_grad_batches
        )
        self.log("train/tokens_seen", float(tokens_seen), reduce_fx="max")
        return loss

    def on_after_backward(self) -> None:
        failpoint("train.after_backward")

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = []
        for p in self.model.parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                norms.append(torch.linalg.vector_norm(g.float()))
        if norms:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        failpoint("val.batch")
        inputs, targets = self.inputs_and_targets(batch)
        self._count_flops(targets, training=False)
        sums = self._val_sums.setdefault(dataloader_idx, torch.zeros(2, device=inputs.device))
        sums += val_sums(self.model, inputs, targets)

    def on_validation_epoch_end(self) -> None:
        names, weights = self._val_sources()
        # Every rank reduces every loader's sums, in the same order, even a rank that got no
        # batch of some loader (else the others wait for it forever: litgpt #2319).
        loaders = (
            self.trainer.num_sanity_val_batches
            if self.trainer.sanity_checking
            else self.trainer.num_val_batches
        )
        rows = []
        for idx in range(len(loaders)):
            zeros = torch.zeros(2, device=self.trainer.strategy.root_device)
            sums = self.trainer.strategy.reduce(self._val_sums.get(idx, zeros), reduce_op="sum")
            name = names[idx] if idx < len(names) else f"source{idx}"
            weight = weights[idx] if idx < len(weights) else 1.0
            rows.append((name, weight, sums[0].item(), sums[1].item()))
        metrics = val_metrics(rows)
        self._val_sums.clear()
        if self.trainer.sanity_checking:
            # Lightning drops metrics logged during the sanity check; with num_sanity_val_steps=-1
            # it is a full evaluation of the untrained model, so record it as step 0.
            if self.logger is not None and self.global_step == 0 and metrics:
                self.logger.log_metrics(metrics, step=0)
            return
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key == "val/loss")

    def _val_sources(self) -> tuple[list[str], list[float]]:
        dm = getattr(self.trainer, "datamodule", None)
        pairs = dm.val_sources() if hasattr(dm, "val_sources") else []
        return [name for name, _ in pairs], [weight for _, weight in pairs]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint of another model shape (before load_state_dict fails)."""
        from tinyrecipe.convert import config_from_hparams

        theirs = config_from_hparams(checkpoint.get("hyper_parameters", {}), self.hparams.preset)
        if detail := _shape_diff(theirs, self.config):
            raise ValueError(
                f"checkpoint holds another model ({detail}, checkpoint vs recipe); resume with the "
                "recipe that wrote it or start without --ckpt_path"
            )

    # -- optimisation --------------------------------------------------------------------------

    def build_optimizer(
        self, max_steps: int | None = None
    ) -> tuple[torch.optim.Optimizer, LambdaLR]:
        """AdamW over the decoder and its warmup + cosine schedule (stepped per optimizer step):
        what `configure_optimizers` gives the Trainer and `tinyrecipe.fabric` uses itself."""
        hp = self.hparams
        optimizer = build_adamw(
            self.model,
            hp.lr,
            hp.betas,
            hp.eps,
            hp.weight_decay,
            hp.decay_norms_and_embeddings,
            hp.optimizer_kernel,
        )
        max_steps = hp.max_steps or max_steps
        if max_steps is None or max_steps < 0:
            raise ValueError(
                "set trainer.max_steps (or model.max_steps): the cosine schedule needs its length"
            )

        def factor(step: int) -> float:
            return warmup_cosine_lr(step, hp.lr, hp.min_lr, hp.warmup_steps, max_steps) / hp.lr

        return optimizer, LambdaLR(optimizer, factor)

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = self.build_optimizer(self.trainer.max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

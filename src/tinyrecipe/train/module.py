"""`CausalLMModule`: the LightningModule that trains the decoder. Thin by design: the model, its
parallelisation, the step (`tinyrecipe.train.step`, shared with the Fabric loop), the optimizer
and schedule live in their own modules; strategy and precision are Trainer arguments chosen by
the recipe."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from tinyrecipe._lightning import attached_trainer, check_sigterm_at_logging_steps
from tinyrecipe.checkpoint import check_resume
from tinyrecipe.faults import failpoint
from tinyrecipe.model import Llama
from tinyrecipe.model.config import DEFAULT_PRESET, ModelOverrides, overrides_dict
from tinyrecipe.model.llama import LMOutput
from tinyrecipe.planning.flops import forward_flops_per_token, train_flops_per_token
from tinyrecipe.train.build import (
    FSDP1_REFUSED,
    adapter_params,
    build_guards,
    build_model,
    build_optimizer,
    describe,
)
from tinyrecipe.train.optim import RecipeLR, set_scheduled_lr
from tinyrecipe.train.settings import (
    GUARD,
    NO_LORA,
    OPTIMIZER,
    SCHEDULE,
    SPEED,
    LoRASettings,
    ModelSettings,
    OptimizerSettings,
    ScheduleSettings,
    SpeedSettings,
    StepGuard,
)
from tinyrecipe.train.step import (
    finish_step,
    per_token_loss,
    step_loss,
    val_metrics,
    val_sums,
)


class CausalLMModule(L.LightningModule):
    """Next-token pretraining of a `Llama` built from a preset plus field overrides.

    Args:
        preset: a `ModelConfig` preset name ("tiny", "tinyllama-1.1b", ...).
        config: `ModelConfig` fields replacing the preset's (e.g. {"vocab_size": 8192}).
        init_from: a tinyrecipe checkpoint (e.g. from `tinyrecipe convert from-hf`) or a Hugging
            Face directory whose weights the model starts from; its shape must match.
        optimizer, schedule, guard, speed, lora: the grouped training settings
            (`tinyrecipe.train.settings`: AdamW, the learning-rate schedule, the bad-step
            policy, speed switches, LoRA fine-tuning).

    Logged per optimizer step, without a host sync or a collective beyond the step's one
    all-reduce (`tinyrecipe.train.step.finish_step`): train/loss (mean over the step's
    micro-batches and ranks), train/grad_norm (before clipping), train/tokens_seen,
    train/skipped_steps.
    """

    def __init__(
        self,
        preset: str = DEFAULT_PRESET,
        config: ModelOverrides | None = None,
        init_from: str | None = None,
        optimizer: OptimizerSettings = OPTIMIZER,
        schedule: ScheduleSettings = SCHEDULE,
        guard: StepGuard = GUARD,
        speed: SpeedSettings = SPEED,
        lora: LoRASettings = NO_LORA,
    ) -> None:
        super().__init__()
        self.settings = ModelSettings(
            preset, overrides_dict(config) or {}, init_from, optimizer, schedule, guard, speed, lora
        )
        # plain values in the checkpoint (weights_only loading reads no dataclasses)
        self.save_hyperparameters(self.settings.as_dict())
        self.config = self.settings.model_config
        self.guard, self.spikes = build_guards(self.settings)
        self.adapter_params = adapter_params(self.settings)  # 0: no LoRASettings
        self.model: Llama | None = None
        self._val_sums: dict[int, torch.Tensor] = {}
        self._flops_per_batch = 0.0
        self._tokens = 0  # of the last micro-batch
        self._loss_sum: torch.Tensor | None = None
        self._z_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._target_tokens: torch.Tensor | None = None  # of the step, with per-token losses
        self._per_token = False
        self._skipped: torch.Tensor | None = None
        self._spiked: torch.Tensor | None = None

    # -- model ---------------------------------------------------------------------------------

    def build_model(
        self, mesh=None, bf16: bool = False, device=None, reshard_after_forward: bool = True
    ) -> Llama:
        """`train.build.build_model` of this module's settings (FSDP1 refused)."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = attached_trainer(self)
        if trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(FSDP1_REFUSED)
        return build_model(self.settings, mesh, bf16, device, reshard_after_forward)

    def configure_model(self) -> None:
        """Build (and, under FSDP2, shard) the decoder. Called by Lightning on every strategy."""
        if self.model is not None:
            return
        mesh = self.device_mesh  # set by Lightning's ModelParallelStrategy
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        if mesh is not None:  # FSDP2Strategy's own (a 2-D one under HSDP), else Lightning's
            mesh = getattr(strategy, "fsdp_mesh", None) or mesh["data_parallel"]
        self.model = self.build_model(
            mesh=mesh,
            bf16=trainer is not None and "bf16" in str(trainer.precision),
            device=strategy.root_device if strategy is not None else None,
            reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
        )

    def on_fit_start(self) -> None:
        """Say which speed paths run (never a silent slow path)."""
        precision = str(self.trainer.precision)
        rank_zero_info(describe(self.settings, precision, self.trainer.strategy.root_device))
        self._per_token = per_token_loss(getattr(self.trainer, "datamodule", None))
        if self._per_token and self.trainer.gradient_clip_algorithm == "value":
            raise ValueError(
                "trainer.gradient_clip_algorithm: value clips the summed per-token gradients of "
                "SFT data before their normalisation; use norm (the default)"
            )
        check_sigterm_at_logging_steps(self.trainer)

    def on_train_start(self) -> None:
        """A resumed run's first step takes this recipe's schedule and AdamW settings, not those
        stored with the optimizer (a cooldown branch changes the schedule at the checkpoint's
        step)."""
        for config in self.trainer.lr_scheduler_configs:
            set_scheduled_lr(config.scheduler)
        # tokens trained on before this run's first step: the data position when the DataModule
        # keeps one (right even when an earlier run had another global batch)
        dm = getattr(self.trainer, "datamodule", None)
        samples = dm.state_dict().get("samples_consumed") if hasattr(dm, "state_dict") else None
        tokens = samples * dm.block_size if samples is not None else None
        self._tokens_at_start = (self.global_step, tokens)

    @property
    def flops_per_batch(self) -> float:
        """FLOPs of the last micro-batch, training or evaluation (read by the throughput monitor)."""
        return self._flops_per_batch

    def _count_flops(self, batch: dict[str, torch.Tensor], training: bool) -> None:
        labels = batch["labels"]
        self._tokens = labels.numel()
        per_token = self.train_flops_per_token if training else self.forward_flops_per_token
        self._flops_per_batch = self._tokens * per_token(labels.size(1))

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of this module's decoder (a LoRA run's frozen matrices take
        no weight gradient): the one count both loops' throughput logs use."""
        return train_flops_per_token(self.config, seq_len, self.adapter_params)

    def forward_flops_per_token(self, seq_len: int) -> float:
        return forward_flops_per_token(self.config, seq_len)

    # -- steps ---------------------------------------------------------------------------------

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> LMOutput:
        """The decoder's `LMOutput` (`Llama.forward`; `documents`: the document mask)."""
        return self.model(inputs, targets, documents=documents)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._count_flops(batch, training=True)
        loss, z, n = step_loss(self.model, batch, self._per_token)
        if n is not None:
            self._target_tokens = n if self._target_tokens is None else self._target_tokens + n
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        if z is not None:
            self._z_sum = z if self._z_sum is None else self._z_sum + z
        self._micro_batches += 1
        return loss

    def on_after_backward(self) -> None:
        failpoint("train.after_backward")

    def on_before_optimizer_step(self, optimizer) -> None:
        """The end of every optimizer step: the shared `finish_step` (norm, loss, clipping by
        `trainer.gradient_clip_val`, non-finite skip), then the logs."""
        max_norm = self.trainer.gradient_clip_val
        if max_norm and self.trainer.gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, max_norm, "value")
            max_norm = None
        # Lightning divides every micro-batch's loss by accumulate_grad_batches, also in an
        # epoch's shorter last step: per token, the gradients are rescaled from that
        per_token_divisor = self.trainer.accumulate_grad_batches
        stats = finish_step(
            list(self.model.parameters()),
            self._loss_sum,
            per_token_divisor if self._per_token else self._micro_batches,
            max_norm=max_norm,
            optimizer=optimizer,
            z_sum=self._z_sum,
            spikes=self.spikes,
            tokens=self._target_tokens,
        )
        self._loss_sum, self._z_sum, self._micro_batches = None, None, 0
        self._target_tokens = None
        self.guard.record(stats, self.global_step)
        self._skipped = (
            stats.nonfinite if self._skipped is None else self._skipped + stats.nonfinite
        )
        if stats.spike is not None:
            self._spiked = stats.spike if self._spiked is None else self._spiked + stats.spike
            self.log("train/spike_skips", self._spiked)
        if stats.z_loss is not None:
            self.log("train/z_loss", stats.z_loss)
        per_step = self._tokens * self.trainer.world_size * self.trainer.accumulate_grad_batches
        start_step, before = getattr(self, "_tokens_at_start", (0, None))
        if before is None:
            before = start_step * per_step
        self.log("train/loss", stats.loss)
        self.log("train/grad_norm", stats.grad_norm)
        self.log("train/skipped_steps", self._skipped)
        tokens = before + (self.global_step + 1 - start_step) * per_step
        # a device fill, not a tensor built from a Python float (a host-to-device copy per step)
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no fp64
        self.log("train/tokens_seen", torch.full((), tokens, device=self.device, dtype=wide))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Nothing: `on_before_optimizer_step` clips by the norm the step reduces once."""

    def on_train_end(self) -> None:
        self.guard.flush()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        failpoint("val.batch")
        self._count_flops(batch, training=False)
        labels = batch["labels"]
        sums = self._val_sums.setdefault(dataloader_idx, torch.zeros(2, device=labels.device))
        sums += val_sums(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        names, weights = self._val_sources()
        # Every rank reduces every loader's sums, in the same order, even a rank that got no
        # batch of some loader (else the others wait for it forever: litgpt #2319).
        loaders = (
            self.trainer.num_sanity_val_batches
            if self.trainer.sanity_checking
            else self.trainer.num_val_batches
        )
        device = self.trainer.strategy.root_device
        zeros = torch.zeros(2, device=device)
        packed = torch.stack([self._val_sums.get(i, zeros) for i in range(len(loaders))])
        packed = self.trainer.strategy.reduce(packed, reduce_op="sum").tolist()  # one collective
        rows = [
            (
                names[i] if i < len(names) else f"source{i}",
                weights[i] if i < len(weights) else 1.0,
                *packed[i],
            )
            for i in range(len(loaders))
        ]
        metrics = val_metrics(rows)
        self._val_sums.clear()
        if self.trainer.sanity_checking:
            # Lightning drops metrics logged during the sanity check; with num_sanity_val_steps=-1
            # it is a full evaluation of the untrained model, so record it as step 0.
            if self.logger is not None and self.global_step == 0 and metrics:
                self.logger.log_metrics(metrics, step=0)
            return
        for key, value in metrics.items():
            # equal on every rank already; sync_dist says so to Lightning (whose warning it
            # silences) at the cost of one more small all-reduce per metric and validation
            self.log(key, value, prog_bar=key == "val/loss", sync_dist=True)

    def _val_sources(self) -> tuple[list[str], list[float]]:
        dm = getattr(self.trainer, "datamodule", None)
        pairs = dm.val_sources() if hasattr(dm, "val_sources") else []
        return [name for name, _ in pairs], [weight for _, weight in pairs]

    def check_resume(self, hparams: dict[str, Any]) -> None:
        """Refuse, in one line, to resume a checkpoint (its hyper-parameters) of another model
        shape or LoRA setting (`checkpoint.check_resume`)."""
        check_resume(hparams, self.hparams, self.config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint of another model shape (before load_state_dict
        fails); let the DataModule restate the loops' batch counters in this run's micro-batches
        (a resume on another number of processes or micro-batch size)."""
        self.check_resume(checkpoint.get("hyper_parameters", {}))
        trainer = attached_trainer(self)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if hasattr(dm, "adapt_loop_progress"):
            dm.adapt_loop_progress(checkpoint)
        if self.spikes is not None and "spike_skipper" in checkpoint:
            self.spikes.load_state_dict(checkpoint["spike_skipper"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The spike window, so a resumed run judges spikes as the uninterrupted one would."""
        if self.spikes is not None:
            checkpoint["spike_skipper"] = self.spikes.state_dict()

    # -- optimisation --------------------------------------------------------------------------

    def build_optimizer(
        self, max_steps: int | None = None
    ) -> tuple[torch.optim.Optimizer, RecipeLR]:
        """`train.build.build_optimizer` over the decoder (stepped per optimizer step)."""
        return build_optimizer(self.model, self.settings, max_steps)

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = self.build_optimizer(self.trainer.max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

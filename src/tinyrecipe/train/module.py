"""`CausalLMModule`: the LightningModule that trains the decoder. Thin by design: the model, its
parallelisation, the step (`tinyrecipe.train.step`, shared with the Fabric loop), the optimizer
and schedule live in their own modules; strategy and precision are Trainer arguments chosen by
the recipe."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from tinyrecipe._lightning import check_sigterm_at_logging_steps
from tinyrecipe.faults import failpoint
from tinyrecipe.interop.checkpoint import (
    checkpoint_step,
    config_from_hparams,
    load_tinyrecipe_checkpoint,
)
from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.model.attention import select_backend
from tinyrecipe.model.config import (
    DEFAULT_PRESET,
    SHAPE_FIELDS,
    ModelOverrides,
    overrides_dict,
    resolve_config,
)
from tinyrecipe.model.llama import LMOutput
from tinyrecipe.model.lora import LORA_ALPHA, LORA_TARGETS, check_lora, lora_of, lora_params
from tinyrecipe.model.parallelize import parallelize
from tinyrecipe.planning.flops import (
    compute_dtype,
    forward_flops_per_token,
    train_flops_per_token,
)
from tinyrecipe.train.optim import build_adamw, build_schedule
from tinyrecipe.train.step import (
    NonFiniteGuard,
    SpikeSkipper,
    finish_step,
    per_token_loss,
    step_loss,
    val_metrics,
    val_sums,
)

FSDP1_REFUSED = (
    "trainer.strategy FSDPStrategy (FSDP1) is not supported; use 'fsdp2' "
    "(tinyrecipe.train.strategy.FSDP2Strategy)"
)


def refuse_fsdp1(spec) -> None:
    """FSDP1 (`fsdp`, `FSDPStrategy`) in a recipe's strategy, refused in one line: its flat
    sharded gradients would be normed as if replicated, and it reduces on every micro-batch."""
    name = spec.get("class_path", "") if isinstance(spec, dict) else str(spec or "")
    if name == "fsdp" or name.rpartition(".")[2] == "FSDPStrategy":
        raise ValueError(FSDP1_REFUSED)


def shape_diff(theirs: ModelConfig, ours: ModelConfig) -> str:
    """'n_layer 2 vs 3, ...' over the shape fields that differ; '' when the weights fit."""
    return ", ".join(
        f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}"
        for k in SHAPE_FIELDS
        if getattr(theirs, k) != getattr(ours, k)
    )


def describe(module: CausalLMModule, precision: str, device: torch.device) -> str:
    """The one line a run prints about which speed paths it takes."""
    probe = torch.empty(0, device=device, dtype=compute_dtype(precision))
    hp, cfg = module.hparams, module.config
    lora = ""
    if module.adapter_params:
        lora = f" ({module.adapter_params / 1e6:.2f}M trainable: lora r={hp.lora_rank})"
    return (
        f"tinyrecipe: {cfg.num_params() / 1e6:.1f}M params{lora}, "
        f"attention={select_backend(probe, cfg.attention)}, "
        f"compile={'per-block' if hp.compile else 'off'}, "
        f"activation_checkpointing={hp.activation_checkpointing}, "
        f"linear={'float8' if hp.float8 else 'plain'}, "
        f"loss={f'chunked({cfg.loss_chunk_size})' if cfg.loss_chunk_size else 'plain'}"
        f"{'+compiled' if cfg.loss_chunk_size and hp.compile and probe.dtype != torch.float32 else ''}, "
        f"adamw={hp.optimizer_kernel}, precision={precision}"
    )


def lora_setting(hparams) -> str | None:
    """'rank 8, alpha 16, targets ...' of a module's (or a checkpoint's) LoRA keys; None: off."""
    if (lora := lora_of(hparams)) is None:
        return None
    targets = ", ".join(hparams.get("lora_targets") or LORA_TARGETS)
    return f"rank {lora[0]}, alpha {lora[1]:g}, targets {targets}"


def set_scheduled_lr(scheduler: LambdaLR) -> None:
    """Set each parameter group's learning rate to the schedule's at the scheduler's step."""
    for group, base, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class CausalLMModule(L.LightningModule):
    """Next-token pretraining of a `Llama` built from a preset plus field overrides.

    Args:
        preset: a `ModelConfig` preset name ("tiny", "tinyllama-1.1b", ...).
        config: `ModelConfig` fields replacing the preset's (e.g. {"vocab_size": 8192}).
        lr, min_lr, warmup_steps, max_steps: the learning-rate schedule, in optimizer steps
            (max_steps None: the Trainer's max_steps).
        schedule: "cosine" (warmup, then cosine to min_lr at max_steps), "wsd"
            (warmup-stable-decay) or "constant" (`tinyrecipe.train.optim.Schedule`).
        decay_steps, decay_fraction, decay_shape, decay_from: the wsd decay: its length in
            steps or as a fraction of max_steps, its shape ("linear", "cosine", "1-sqrt"), and
            where it starts (default: so that it ends at max_steps): a step, or a checkpoint
            whose step it is (a cooldown branch resumed from that checkpoint).
        betas, eps, weight_decay: AdamW.
        decay_norms_and_embeddings: True decays every parameter (TinyLlama); False exempts
            norms and embeddings.
        meta_init: build on the meta device and materialise already sharded (large models).
        activation_checkpointing: recompute each block's activations in backward.
        compile: `torch.compile` each decoder block (torchtitan's way: short compile, one graph
            reused by every layer). Speed switches are all off or "auto" by default; the
            chunked loss is `config: {loss_chunk_size: N}`.
        float8: the decoder blocks' linear layers compute in float8 (torchao's dynamic
            tensorwise scaling, torchtitan's `float8` converter): faster matmuls on GPUs with
            float8 (compute capability 8.9+); master weights, names and checkpoints unchanged.
        lora_rank, lora_alpha, lora_targets: LoRA fine-tuning (`tinyrecipe.model.lora`): the
            decoder frozen, a rank-`lora_rank` update scaled by `lora_alpha / lora_rank` trained
            on each block's `lora_targets` (default all four linear layers: attn.qkv,
            attn.proj, mlp.gate_up, mlp.proj). None: every parameter trains. Checkpoints keep
            the adapters beside the weights; every reader merges them.
        optimizer_kernel: AdamW's kernel: "auto" (fused), "fused", "foreach" or "for-loop".
        nonfinite_loss: a step whose loss or gradient is NaN/inf is skipped (no update); then
            "stop" ends the run with the step in the message (weights and the last checkpoint
            are intact), "skip" warns and goes on (train/skipped_steps counts them).
        spike_sigma, spike_window: skip the optimizer step when the loss or the gradient norm
            exceeds the mean + spike_sigma x std of the last spike_window accepted steps
            (None: off); train/spike_skips counts them.
        init_from: a tinyrecipe checkpoint (e.g. from `tinyrecipe convert from-hf`) whose
            weights the model starts from; its shape must match preset + config.

    Logged per optimizer step, without a host sync or a collective beyond the step's one
    all-reduce (`tinyrecipe.train.step.finish_step`): train/loss (mean over the step's
    micro-batches and ranks), train/grad_norm (before clipping), train/tokens_seen,
    train/skipped_steps.
    """

    def __init__(
        self,
        preset: str = DEFAULT_PRESET,
        config: ModelOverrides | None = None,
        lr: float = 4e-4,
        min_lr: float = 4e-5,
        warmup_steps: int = 2000,
        max_steps: int | None = None,
        schedule: str = "cosine",
        decay_steps: int | None = None,
        decay_fraction: float | None = None,
        decay_shape: str | None = None,
        decay_from: int | str | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay_norms_and_embeddings: bool = True,
        meta_init: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        compile: bool = False,
        float8: bool = False,
        lora_rank: int | None = None,
        lora_alpha: float = LORA_ALPHA,
        lora_targets: list[str] | None = None,
        optimizer_kernel: str = "auto",
        nonfinite_loss: str = "stop",
        spike_sigma: float | None = None,
        spike_window: int = 128,
    ) -> None:
        super().__init__()
        self.lora_targets = tuple(lora_targets or LORA_TARGETS)
        check_lora(lora_rank, lora_alpha, self.lora_targets, float8)
        self.guard = NonFiniteGuard(nonfinite_loss)
        self.spikes = SpikeSkipper(spike_sigma, spike_window) if spike_sigma else None
        self.save_hyperparameters(ignore=["config"])
        # A plain dict in the checkpoint (weights_only loading reads no dataclasses): the fields
        # the recipe changed.
        self.hparams["config"] = overrides_dict(config)
        self.config = resolve_config(preset, config)
        self.adapter_params = lora_params(self.config, lora_rank, self.lora_targets)  # 0: no LoRA
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
        """The decoder of this module's config, with init_from's weights, activation
        checkpointing, compile and FSDP2 over `mesh` as the hyper-parameters say (the Trainer
        path and the Fabric loop both build it here)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(FSDP1_REFUSED)
        hp = self.hparams
        if hp.init_from and hp.meta_init:
            raise ValueError(
                "model.init_from needs model.meta_init: false (weights load before sharding)"
            )
        with torch.device("meta") if hp.meta_init else nullcontext():
            model = Llama(self.config)
        if hp.init_from:
            config, state = load_tinyrecipe_checkpoint(hp.init_from)
            if detail := shape_diff(config, self.config):
                raise ValueError(
                    f"model.init_from '{hp.init_from}' holds a different model ({detail}, "
                    "checkpoint vs recipe); set model.preset/model.config to its shape"
                )
            model.load_state_dict(state)
        return parallelize(
            model,
            lora_rank=hp.get("lora_rank"),
            lora_alpha=hp.get("lora_alpha", LORA_ALPHA),
            lora_targets=self.lora_targets,
            float8=hp.float8,
            activation_checkpointing=hp.activation_checkpointing,
            compile=hp.compile,
            mesh=mesh,
            bf16=bf16,
            reshard_after_forward=reshard_after_forward,
            device=device,
        )

    def configure_model(self) -> None:
        """Build (and, under FSDP2, shard) the decoder. Called by Lightning on every strategy."""
        if self.model is not None:
            return
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy
        on_trainer = self._trainer is not None
        strategy = self.trainer.strategy if on_trainer else None
        if mesh is not None:  # FSDP2Strategy's own (a 2-D one under HSDP), else Lightning's
            mesh = getattr(strategy, "fsdp_mesh", None) or mesh["data_parallel"]
        self.model = self.build_model(
            mesh=mesh,
            bf16=on_trainer and "bf16" in str(self.trainer.precision),
            device=strategy.root_device if strategy is not None else None,
            reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
        )

    def on_fit_start(self) -> None:
        """Say which speed paths run (never a silent slow path)."""
        precision = str(self.trainer.precision)
        rank_zero_info(describe(self, precision, self.trainer.strategy.root_device))
        self._per_token = per_token_loss(getattr(self.trainer, "datamodule", None))
        if self._per_token and self.trainer.gradient_clip_algorithm == "value":
            raise ValueError(
                "trainer.gradient_clip_algorithm: value clips the summed per-token gradients of "
                "SFT data before their normalisation; use norm (the default)"
            )
        check_sigterm_at_logging_steps(self.trainer)

    def on_train_start(self) -> None:
        """A resumed run's first step takes this recipe's schedule, not the learning rate stored
        with the optimizer (a cooldown branch changes the schedule at the checkpoint's step)."""
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
            optimizer=getattr(optimizer, "_optimizer", optimizer),
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
        shape or LoRA setting."""
        theirs = config_from_hparams(hparams)
        if detail := shape_diff(theirs, self.config):
            raise ValueError(
                f"checkpoint holds another model ({detail}, checkpoint vs recipe); resume with the "
                "recipe that wrote it or start without --ckpt_path"
            )
        if (lora := lora_setting(hparams)) != lora_setting(self.hparams):
            raise ValueError(
                f"checkpoint was trained with LoRA {lora or 'off'}, the recipe says "
                f"{lora_setting(self.hparams) or 'off'}; resume with the same model.lora_* keys, "
                "or start a new run from it with model.init_from (adapters merged)"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint of another model shape (before load_state_dict
        fails); let the DataModule restate the loops' batch counters in this run's micro-batches
        (a resume on another number of processes or micro-batch size)."""
        self.check_resume(checkpoint.get("hyper_parameters", {}))
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
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
    ) -> tuple[torch.optim.Optimizer, LambdaLR]:
        """AdamW over the decoder and its warmup + cosine schedule (stepped per optimizer step):
        what `configure_optimizers` gives the Trainer and `tinyrecipe.train.fabric` uses itself."""
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
        decay_from = hp.get("decay_from")
        if isinstance(decay_from, str):  # a checkpoint: the cooldown branches at its step
            decay_from = checkpoint_step(decay_from)
        schedule = build_schedule(
            hp.get("schedule", "cosine"),
            hp.lr,
            hp.min_lr,
            hp.warmup_steps,
            hp.max_steps or max_steps,
            hp.get("decay_steps"),
            hp.get("decay_fraction"),
            hp.get("decay_shape"),
            decay_from,
        )

        def factor(step: int) -> float:
            return schedule.lr(step) / hp.lr

        return optimizer, LambdaLR(optimizer, factor)

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = self.build_optimizer(self.trainer.max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

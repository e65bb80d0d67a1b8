"""Reading and writing tinyrecipe checkpoints, whatever wrote them: a Lightning checkpoint of
`CausalLMModule` (one file, or a sharded FSDP2 directory), a Fabric-loop checkpoint, a
`convert from-hf` checkpoint, or a Hugging Face Llama directory. Weights load with
`weights_only` / safetensors: nothing in the files is executed."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from tinyrecipe._lightning import SHARDED_METADATA_FILE
from tinyrecipe.io import atomic_path, short_reason
from tinyrecipe.model import ModelConfig
from tinyrecipe.model.config import DEFAULT_PRESET, resolve_config
from tinyrecipe.model.hf import from_hf_config, from_hf_state_dict
from tinyrecipe.model.lora import lora_of, merge_lora


def config_from_hparams(hparams: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's `hyper_parameters` (CausalLMModule's preset + config) describe."""
    return resolve_config(hparams.get("preset", DEFAULT_PRESET), hparams.get("config"))


def _hf_config(hf_dir: Path) -> ModelConfig:
    return from_hf_config(json.loads((hf_dir / "config.json").read_text()))


def _load_sharded_checkpoint(path: Path) -> dict:
    """A Lightning distributed (FSDP2 / ModelParallelStrategy) checkpoint directory as one dict:
    the shards are consolidated with torch.distributed.checkpoint (on CPU, no process group) and
    Lightning's meta.pt adds the hyper-parameters. Needs the whole model in CPU memory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"checkpoint directory '{path}' is neither a sharded checkpoint (no .metadata) nor a "
            "Hugging Face model (no config.json)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        ckpt = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    meta = path / SHARDED_METADATA_FILE
    if meta.is_file():
        ckpt.update(torch.load(meta, map_location="cpu", weights_only=True))
    return ckpt


def load_tinyrecipe_checkpoint(
    path: str | Path, merge: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, decoder state dict) from any checkpoint tinyrecipe reads: a Lightning checkpoint
    of `CausalLMModule` (a file, or a sharded FSDP2 directory), a `from-hf` checkpoint, or a
    Hugging Face Llama directory. Weights load with weights_only / safetensors: nothing in the
    files is executed. A LoRA run's adapters come merged into their weights (`merge=False`: as
    they are, beside them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        if path.is_dir() and (path / "config.json").is_file():
            config = _hf_config(path)
            return config, from_hf_state_dict(load_hf_state_dict(path), config)
        ckpt = (
            _load_sharded_checkpoint(path)
            if path.is_dir()
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # a file cut short, a shard missing, a damaged header...
        raise ValueError(
            f"checkpoint '{path}' is unreadable ({short_reason(err)}); it was cut short or damaged: use "
            "another checkpoint (an earlier one beside it) or write it again"
        ) from err
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(
            f"checkpoint '{path}' is not a tinyrecipe checkpoint (no state_dict/hyper_parameters)"
        )
    hparams = ckpt["hyper_parameters"]
    config = config_from_hparams(hparams)
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    if merge and (lora := lora_of(hparams)):  # a LoRA run reads as the plain decoder it equals
        rank, alpha = lora
        state = merge_lora(state, alpha / rank)
    return config, state


def checkpoint_meta(path: Path) -> dict | None:
    """A Lightning or Fabric checkpoint's entries without reading its tensors (mmap), or None
    for a format without them (a Hugging Face directory)."""
    if path.is_dir() and (path / SHARDED_METADATA_FILE).is_file():
        return torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=True)
    if path.is_file():  # mmap: the tensors are not read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return None


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint, without reading its tensors where the format allows."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_config(path)
    meta = checkpoint_meta(path)
    if meta is not None and "hyper_parameters" in meta:
        return config_from_hparams(meta["hyper_parameters"])
    return load_tinyrecipe_checkpoint(path)[0]


def checkpoint_lora(path: str | Path) -> tuple[int, float] | None:
    """(lora_rank, lora_alpha) of a LoRA run's checkpoint, None for any other checkpoint."""
    return lora_of((checkpoint_meta(Path(path)) or {}).get("hyper_parameters") or {})


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a training checkpoint (Lightning or Fabric loop) was written at."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' (model.schedule.decay_from) does not exist")
    meta = checkpoint_meta(path) or {}
    if "global_step" not in meta:
        raise ValueError(
            f"checkpoint '{path}' records no training step; give model.schedule.decay_from as a step"
        )
    return int(meta["global_step"])


def save_tinyrecipe_checkpoint(
    config: ModelConfig, state: dict[str, torch.Tensor], path: str | Path
) -> None:
    """A checkpoint `load_tinyrecipe_checkpoint`, `generate` and `init_from` read. `state` is a
    plain decoder's: a LoRA model's goes through `tinyrecipe.model.lora.merged_state_dict`."""
    if any(k.endswith((".lora_a", ".lora_b")) for k in state):
        raise ValueError(
            "the state dict holds LoRA adapters; save merged_state_dict(model) "
            "(tinyrecipe.model.lora) instead of model.state_dict()"
        )
    payload = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": {"preset": "tinyllama-1.1b", "config": asdict(config)},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a HF model directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors").is_file():
        return load_file(hf_dir / "model.safetensors")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(hf_dir / name))
        return state
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"'{hf_dir}' has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )

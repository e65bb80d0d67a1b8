"""Hugging Face Llama directories <-> tinyrecipe checkpoints (`tinyrecipe convert`).

    tinyrecipe convert to-hf out/quickstart/checkpoints/last.ckpt out/hf --tokenizer data/quickstart/tokenizer
    tinyrecipe convert from-hf path/to/TinyLlama-1.1B out/tinyllama.ckpt
    tinyrecipe convert to-peft out/tinyllama-1.1b-lora/checkpoints/last.ckpt out/adapter --base TinyLlama/TinyLlama-1.1B

`to-hf` writes model.safetensors (sharded past --max-shard-gb), config.json, generation_config.json
and the tokenizer files, so `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` load it offline. `from-hf` writes a checkpoint that
`CausalLMModule(init_from=...)` (recipe key `model.init_from`) starts from. `to-peft` writes a
LoRA run's adapters alone as a PEFT adapter (adapter_model.safetensors, adapter_config.json) that
`peft.PeftModel.from_pretrained(base, OUT)` puts on the Hugging Face base model. Weights are
read with safetensors or `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tinyrecipe.checkpoint import (
    checkpoint_lora,
    load_tinyrecipe_checkpoint,
    save_tinyrecipe_checkpoint,
)
from tinyrecipe.io import atomic_path
from tinyrecipe.model.hf import to_hf_config, to_hf_state_dict, to_peft_state_dict


def _write_tokenizer_json(source: Path, target: Path, bos_id: int) -> None:
    """tokenizer.json with a post-processor that starts every encoding with BOS, as the Llama
    tokenizer does: `AutoTokenizer(...)(text)` then gives the ids `tinyrecipe generate` feeds the
    model, under transformers 4.x and 5.x (which ignore tokenizer_config's add_bos_token for a
    fast tokenizer's own file)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(source))
    bos = tok.id_to_token(bos_id)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    tok.save(str(target))


def to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_gb: float = 5.0,
) -> Path:
    """Export a checkpoint as a Hugging Face Llama directory (written to a temp dir, then renamed)."""
    config, state = load_tinyrecipe_checkpoint(ckpt)
    hf_state = {k: v.contiguous().clone() for k, v in to_hf_state_dict(state, config).items()}
    with atomic_path(out_dir) as work:
        work.mkdir()
        _write_hf_dir(work, config, hf_state, tokenizer_dir, max_shard_gb)
    return Path(out_dir)


def save_safetensors(tensors: dict, path: Path) -> None:
    """safetensors' `save_file` with the file mode any other new file gets (it writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def to_peft(ckpt: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Export a LoRA run's adapters as a PEFT LoRA adapter directory for the Hugging Face form of
    its base model (`base_model`: its hub name or directory, recorded in adapter_config.json)."""
    lora = checkpoint_lora(ckpt)
    if lora is None:
        raise ValueError(
            f"checkpoint '{ckpt}' holds no LoRA adapters (trained without model.lora.rank); "
            "export the whole model with tinyrecipe convert to-hf"
        )
    rank, alpha = lora
    config, state = load_tinyrecipe_checkpoint(ckpt, merge=False)
    adapters, modules = to_peft_state_dict(state, config)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    with atomic_path(out_dir) as work:
        work.mkdir()
        tensors = {k: v.contiguous().clone() for k, v in adapters.items()}
        save_safetensors(tensors, work / "adapter_model.safetensors")
        (work / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Path(out_dir)


def _write_hf_dir(work: Path, config, hf_state: dict, tokenizer_dir, max_shard_gb: float) -> None:
    bos, eos = 1, 2
    if tokenizer_dir is not None:
        from tinyrecipe.data.tokenizer import load_tokenizer, special_tokens

        tok = load_tokenizer(tokenizer_dir)
        bos, eos = tok.bos_id, tok.eos_id
        bos_token, eos_token = special_tokens(Path(tokenizer_dir))
        if (Path(tokenizer_dir) / "tokenizer.model").is_file():
            shutil.copy(Path(tokenizer_dir) / "tokenizer.model", work / "tokenizer.model")
        if (Path(tokenizer_dir) / "tokenizer.json").is_file():
            _write_tokenizer_json(
                Path(tokenizer_dir) / "tokenizer.json", work / "tokenizer.json", bos
            )
        (work / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizerFast"
                    if (work / "tokenizer.json").exists()
                    else "LlamaTokenizer",
                    "bos_token": bos_token,
                    "eos_token": eos_token,
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "split_special_tokens": True,  # "<s>" in text is text, as in prep
                    "model_max_length": config.block_size,
                },
                indent=2,
            )
        )
    dtype = next(iter(hf_state.values())).dtype
    hf_config = to_hf_config(
        config, bos_token_id=bos, eos_token_id=eos, torch_dtype=str(dtype).removeprefix("torch.")
    )
    (work / "config.json").write_text(json.dumps(hf_config, indent=2))
    (work / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2)
    )

    limit = max_shard_gb * 1e9
    shards, current, size = [], {}, 0
    for key, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_safetensors(shards[0], work / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, work / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        (work / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


def from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert a HF Llama directory into a tinyrecipe checkpoint."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"'{hf_dir}' has no config.json; pass a Hugging Face model directory"
        )
    config, state = load_tinyrecipe_checkpoint(hf_dir)  # its HF-directory branch
    save_tinyrecipe_checkpoint(config, state, out)
    return Path(out)

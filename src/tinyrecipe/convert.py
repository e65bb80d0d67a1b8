"""`tinyrecipe convert`: Hugging Face Llama directories <-> tinyrecipe checkpoints.

    tinyrecipe convert to-hf out/quickstart/checkpoints/last.ckpt out/hf --tokenizer data/quickstart/tokenizer
    tinyrecipe convert from-hf path/to/TinyLlama-1.1B out/tinyllama.ckpt

`to-hf` writes model.safetensors (sharded past --max-shard-gb), config.json, generation_config.json
and the tokenizer files, so `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` load it offline. `from-hf` writes a checkpoint that
`CausalLMModule(init_from=...)` (recipe key `model.init_from`) starts from. Weights are read
with safetensors or `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from tinyrecipe.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from tinyrecipe.model import ModelConfig


def config_from_hparams(hparams: dict, default_preset: str = "tiny") -> ModelConfig:
    """The ModelConfig a checkpoint's `hyper_parameters` (CausalLMModule's preset + config) describe."""
    return ModelConfig.from_name(
        hparams.get("preset", default_preset), **(hparams.get("config") or {})
    )


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
    meta = path / "meta.pt"
    if meta.is_file():
        ckpt.update(torch.load(meta, map_location="cpu", weights_only=True))
    return ckpt


def load_tinyrecipe_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, decoder state dict) from any checkpoint tinyrecipe reads: a Lightning checkpoint
    of `CausalLMModule` (a file, or a sharded FSDP2 directory), a `from-hf` checkpoint, or a
    Hugging Face Llama directory. Weights load with weights_only / safetensors: nothing in the
    files is executed."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        config = _hf_config(path)
        return config, from_hf_state_dict(load_hf_state_dict(path), config)
    if path.is_dir():
        ckpt = _load_sharded_checkpoint(path)
    elif path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(
            f"checkpoint '{path}' is not a tinyrecipe checkpoint (no state_dict/hyper_parameters)"
        )
    config = config_from_hparams(ckpt["hyper_parameters"])
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    return config, state


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint, without reading its tensors where the format allows."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_config(path)
    if path.is_dir() and (path / "meta.pt").is_file():
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        return config_from_hparams(meta.get("hyper_parameters", {}))
    if path.is_file():  # mmap: the tensors are not read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "hyper_parameters" in ckpt:
            return config_from_hparams(ckpt["hyper_parameters"])
    return load_tinyrecipe_checkpoint(path)[0]


def save_tinyrecipe_checkpoint(
    config: ModelConfig, state: dict[str, torch.Tensor], path: str | Path
) -> None:
    """A checkpoint `load_tinyrecipe_checkpoint`, `generate` and `init_from` read."""
    payload = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": {"preset": "tinyllama-1.1b", "config": asdict(config)},
    }
    _atomic(Path(path), lambda tmp: torch.save(payload, tmp))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_gb: float = 5.0,
) -> Path:
    """Export a checkpoint as a Hugging Face Llama directory (written to a temp dir, then renamed)."""
    from safetensors.torch import save_file

    config, state = load_tinyrecipe_checkpoint(ckpt)
    hf_state = {k: v.contiguous().clone() for k, v in to_hf_state_dict(state, config).items()}
    out = Path(out_dir)
    work = Path(
        tempfile.mkdtemp(
            prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None
        )
    )
    bos, eos = 1, 2
    if tokenizer_dir is not None:
        from tinyrecipe.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        bos, eos = tok.bos_id, tok.eos_id
        for name in ("tokenizer.json", "tokenizer.model"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, work / name)
        (work / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizerFast"
                    if (work / "tokenizer.json").exists()
                    else "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
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
        save_file(shards[0], work / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, work / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        (work / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyrecipe convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="checkpoint -> Hugging Face directory")
    to.add_argument("ckpt")
    to.add_argument("out_dir")
    to.add_argument(
        "--tokenizer", help="directory with tokenizer.json / tokenizer.model to include"
    )
    to.add_argument("--max-shard-gb", type=float, default=5.0)
    frm = sub.add_parser("from-hf", help="Hugging Face directory -> checkpoint")
    frm.add_argument("hf_dir")
    frm.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.direction == "to-hf":
            print(f"wrote {to_hf(args.ckpt, args.out_dir, args.tokenizer, args.max_shard_gb)}")
        else:
            print(f"wrote {from_hf(args.hf_dir, args.out)}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"tinyrecipe convert: error: {err}", file=sys.stderr)
        return 2
    return 0

"""Fine-tuning from Python (a notebook): pretrained weights in, SFT data, `Trainer.fit`, answers.

    import lightning as L
    from tinyrecipe.train.finetune import answer, load_pretrained, sft_data

    module = load_pretrained(
        "out/quickstart/checkpoints/last.ckpt", optimizer={"lr": 3e-4}, schedule={"warmup_steps": 10}
    )
    data = sft_data(records, tokenizer_dir="data/quickstart/tokenizer", block_size=128)
    L.Trainer(max_steps=100, accelerator="cpu").fit(module, data)
    print(answer(module, "data/quickstart/tokenizer", "What does len() return?"))

`load_pretrained` takes a tinyrecipe/Lightning checkpoint (file or sharded directory), a
`tinyrecipe convert from-hf` checkpoint, or a Hugging Face Llama directory. The recipe form of
the same is `recipes/finetune/*.yaml` (`tinyrecipe fit --config ...`).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from tinyrecipe.checkpoint import checkpoint_config
from tinyrecipe.data.sft import SFTDataModule, format_prompt
from tinyrecipe.train.module import CausalLMModule
from tinyrecipe.train.settings import GROUPS, OptimizerSettings, ScheduleSettings, moved_key

# Fine-tuning defaults: a lower peak LR than pretraining, no weight decay, a short warmup.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    optimizer=OptimizerSettings(lr=2e-5, weight_decay=0.0, decay_norms_and_embeddings=False),
    schedule=ScheduleSettings(min_lr=2e-6, warmup_steps=20),
)


def load_pretrained(path: str | Path, **module_kwargs: Any) -> CausalLMModule:
    """A `CausalLMModule` whose decoder starts from the weights at `path` (shape read from it).
    `module_kwargs` are CausalLMModule's arguments; a settings group given as a dict
    (`optimizer={"lr": 3e-4}`, `lora={"rank": 16}`) changes those fields of
    `FINETUNE_DEFAULTS`' (or the group's defaults)."""
    config = asdict(checkpoint_config(path))
    config.update(module_kwargs.pop("config", None) or {})
    kwargs = dict(FINETUNE_DEFAULTS)
    for key, value in module_kwargs.items():
        if (new := moved_key(key, value)) is not None:
            raise ValueError(
                f"load_pretrained({key}=...) is now {new.replace('.', '={', 1)}: ...}}"
            )
        if key in GROUPS and isinstance(value, dict):
            value = replace(kwargs.get(key) or GROUPS[key](), **value)
        kwargs[key] = value
    return CausalLMModule(preset="tinyllama-1.1b", config=config, init_from=str(path), **kwargs)


def sft_data(
    records_or_file: list[dict] | str | Path, tokenizer_dir: str | Path, **kwargs: Any
) -> SFTDataModule:
    """An `SFTDataModule` from a list of records or a JSON-lines file (see tinyrecipe.data.sft)."""
    if isinstance(records_or_file, (str, Path)):
        return SFTDataModule(
            train_file=str(records_or_file), tokenizer_dir=str(tokenizer_dir), **kwargs
        )
    return SFTDataModule(records=list(records_or_file), tokenizer_dir=str(tokenizer_dir), **kwargs)


@torch.no_grad()
def answer(
    module: CausalLMModule,
    tokenizer_dir: str | Path,
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The model's reply to `prompt` in the SFT template (greedy by default), up to `</s>`."""
    from tinyrecipe.data.tokenizer import load_tokenizer
    from tinyrecipe.generation import generate

    if module.model is None:
        module.configure_model()
    model = module.model
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = [tokenizer.bos_id] + tokenizer.encode(format_prompt(prompt, system))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=torch.Generator(device=device).manual_seed(seed),
        eos_id=tokenizer.eos_id,
    )[0, len(ids) :].tolist()
    model.train(was_training)
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)

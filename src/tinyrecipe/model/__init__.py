"""The Llama-2 decoder in plain PyTorch (no Lightning): `ModelConfig`, presets and `Llama`.

`Llama` (and with it torch) loads on first use, so arithmetic on configs (`tinyrecipe plan`,
`tinyrecipe memory`) starts without it."""

from tinyrecipe.model.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "Llama", "ModelConfig"]


def __getattr__(name: str):
    if name == "Llama":
        from tinyrecipe.model.llama import Llama

        return Llama
    raise AttributeError(f"module 'tinyrecipe.model' has no attribute {name!r}")

"""The Llama-2 decoder in plain PyTorch (no Lightning): `ModelConfig`, presets, `Llama` and
its output `LMOutput`.

`Llama` (and with it torch) loads on first use, so arithmetic on configs (`tinyrecipe plan`,
`tinyrecipe memory`) starts without it."""

from tinyrecipe.model.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "LMOutput", "Llama", "ModelConfig"]


def __getattr__(name: str):
    if name in ("Llama", "LMOutput"):
        from tinyrecipe.model import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'tinyrecipe.model' has no attribute {name!r}")

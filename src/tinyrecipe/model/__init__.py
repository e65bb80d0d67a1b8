"""The Llama-2 decoder in plain PyTorch (no Lightning): `ModelConfig`, presets and `Llama`."""

from tinyrecipe.model.config import PRESETS, ModelConfig
from tinyrecipe.model.llama import Llama

__all__ = ["PRESETS", "Llama", "ModelConfig"]

"""Recipe files read outside LightningCLI (`tinyrecipe memory`, `tinyrecipe fabric`): several
YAML files merged in order like `--config a.yaml --config b.yaml`, then dotted overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

# The DataModule a recipe's `data:` means when it names no class_path.
DEFAULT_DATA = "tinyrecipe.data.datamodule.MixedStreamingDataModule"


def merge(base: dict, overlay: dict) -> dict:
    """`overlay` on top of `base`: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def load_recipe(paths: list[str], overrides: list[str] = ()) -> dict:
    """Recipe files merged in order, then `a.b.c=value` overrides (values parsed as YAML)."""
    recipe: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe '{path}' does not exist")
        recipe = merge(recipe, yaml.safe_load(Path(path).read_text()) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' is not key=value (e.g. trainer.max_steps=50)")
        node = recipe
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return recipe

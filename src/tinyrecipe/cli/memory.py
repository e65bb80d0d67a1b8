"""`tinyrecipe memory --config recipes/X.yaml [--config overlay.yaml] [--a.b value]`: training
memory per device for a recipe, read by the same parser as `tinyrecipe fit`
(`tinyrecipe.planning.memory`)."""

from __future__ import annotations

from tinyrecipe.cli.fit import parse_recipe
from tinyrecipe.planning.memory import recipe_memory


def main(argv: list[str] | None = None) -> int:
    recipe, _ = parse_recipe(list(argv or []))
    estimate, s = recipe_memory(recipe)
    how = f"FSDP over {s['world_size']}" if s["sharded"] else f"{s['world_size']} full copies"
    how = "one device" if s["world_size"] == 1 and not s["sharded"] else how
    lora = f", LoRA ({s['lora'] / 1e6:,.2f}M trained)" if s["lora"] else ""
    print(
        f"{s['params'] / 1e6:,.1f}M-parameter model ({s['preset']} preset + recipe changes), "
        f"micro-batch {s['micro_batch']} x {s['seq_len']}, {s['precision']}, {how}"
        f"{', activation checkpointing' if s['activation_checkpointing'] else ''}{lora}"
        f"{', accumulating ' + str(s['accumulation']) if s['accumulation'] > 1 else ''}: per device"
    )
    print(estimate.table())
    return 0

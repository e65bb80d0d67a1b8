"""A checked-in loss curve (torchtitan keeps such curves beside its tests): 60 steps of a small
decoder on fixed synthetic data through `tinyrecipe fit`, compared step by step with
tests/assets/losses/micro-60.json. A change that moves the curve (the model, the loss, the
data order, the optimizer, the schedule, clipping) fails here even when every unit test holds.

Tolerance, measured: numerically equivalent runs stay within 1e-6 of each other over the 60
steps (1 or 2 torch threads: 0; the Fabric loop instead of the Trainer: 0; the chunked loss
instead of the plain one: 9.5e-7), while real changes move the curve far more (lr x 1.01:
6.1e-3; one warmup step less: 2.0e-2; another data seed: 0.35). 1e-4 sits between the two:
100x the rounding, 60x below a 1% change of the learning rate.

    TINYRECIPE_UPDATE_REFERENCE=1 pytest tests/test_reference_loss.py   # rewrite the curve
"""

import json
import os

import pytest
import yaml

from tests.conftest import ROOT, tinyrecipe
from tests.test_training import scalars
from tinyrecipe.data.prep import markov_documents, write_synthetic_split

pytestmark = pytest.mark.fast  # make test-fast

REFERENCE = ROOT / "tests/assets/losses/micro-60.json"
TOLERANCE = 1e-4
SHAPE = {
    "n_layer": 2,
    "d_model": 64,
    "n_head": 4,
    "n_kv_head": 2,
    "d_ff": 176,
    "vocab_size": 512,
    "block_size": 64,
}


def reference_recipe(tmp_path, **changes) -> str:
    data = tmp_path / "data"
    if not data.exists():
        write_synthetic_split(
            data / "a", markov_documents(200_000, 512, 1024, seed=1), 512, 65 * 64
        )
        write_synthetic_split(
            data / "b", markov_documents(100_000, 512, 1024, seed=2), 512, 65 * 64
        )
    recipe = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 60,
            "val_check_interval": 1000,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "gradient_clip_val": 1.0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "checkpoint": {"every_n_train_steps": 1000},
        "model": {
            "preset": "tiny",
            "config": SHAPE,
            "optimizer": {"lr": 3e-3},
            "schedule": {"min_lr": 3e-4, "warmup_steps": 5},
        },
        "data": {
            "sources": [
                {"name": "a", "train": str(data / "a"), "weight": 0.7},
                {"name": "b", "train": str(data / "b"), "weight": 0.3},
            ],
            "block_size": 64,
            "batch_size": 4,
        },
    }
    for key, value in changes.items():
        node = recipe
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def loss_curve(tmp_path, command: str = "fit", **changes) -> list[float]:
    result = tinyrecipe(command, "--config", reference_recipe(tmp_path, **changes))
    assert result.returncode == 0, result.stderr[-3000:]
    logs = tmp_path / "run" / ("fabric" if command == "fabric" else "tensorboard")
    return [loss for _, loss in scalars(logs)["train/loss"]]


def test_the_loss_curve_matches_the_checked_in_reference(tmp_path):
    curve = loss_curve(tmp_path)
    if os.environ.get("TINYRECIPE_UPDATE_REFERENCE"):
        REFERENCE.write_text(
            json.dumps({"steps": len(curve), "train/loss": curve}, indent=1) + "\n"
        )
    reference = json.loads(REFERENCE.read_text())["train/loss"]
    assert len(curve) == len(reference) == 60
    worst = max(abs(a - b) for a, b in zip(curve, reference, strict=True))
    assert worst <= TOLERANCE, f"the loss curve moved by up to {worst:.2e} (tolerance {TOLERANCE})"
    assert reference[-1] < reference[0] - 0.5  # it is a curve that learns

"""The benchmark scripts run end to end (tiny sizes) and print what they promise."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_bench_train_reports_every_run_against_the_peers():
    quick = ["--repeats", "1", "--steps", "1", "--warmup", "1", "--seq", "64", "--batch", "2"]
    result = run("bench_train.py", *quick, "--runs", "ours", "ours-chunked", "hf", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert set(report["runs"]) == {"ours", "ours-chunked", "hf"}
    assert report["peak_source"].startswith("measured") and report["peak_flops"] > 1e9
    for row in report["runs"].values():
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_mib"] > 0
        assert row["vs_fastest_peer"] is not None and row["faults_per_step"] >= 0
    assert report["runs"]["hf"]["vs_hf"] == 1.0
    assert report["runs"]["ours-chunked"]["estimate_mib"] > 0
    table = run("bench_train.py", *quick, "--runs", "ours", "hf")
    assert table.returncode == 0 and "tokens/s" in table.stdout and "faults" in table.stdout


def test_gpu_check_runs_its_real_paths_on_cpu(tmp_path):
    """`make gpu-check`'s CPU dry run: the TinyLlama recipe through the fit parser and Trainer
    on 2 processes started by torchrun, as on a machine of several GPUs (FSDP2, accumulation,
    clipping, validation, a sharded checkpoint), the attention backends, bf16 against fp32 and
    generation, each reported."""
    result = run("gpu_check.py", "--cpu", "--devices", "2", "--out", str(tmp_path), "--profile")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    recipe = report["recipe eager"]
    assert report["env"]["devices"] == 2 and recipe["devices"] == 2 and recipe["rank"] == 0
    assert "compile=off" in recipe["describe"] and "precision=32-true" in recipe["describe"]
    assert recipe["tokens_per_s"] > 0 and 0 < recipe["mfu"] < 1 and recipe["steps_timed"] >= 1
    assert recipe["checkpoint_complete"] and recipe["val_loss"] > 0
    assert report["attention"]["sdpa math"]["rel_error"] < 1e-5
    assert "not installed" in report["attention"]["flash-attn"]["error"]
    assert "not installed" in report["attention"]["flash-attn 3"]["error"]
    assert report["attention"]["auto (chooses sdpa)"]["rel_error"] < 1e-5
    for fallback in ("document mask, sdpa", "document mask, sdpa grouped kv"):
        assert report["attention"][fallback]["rel_error"] < 1e-5  # fp32 on CPU
    assert "not available" in report["attention"]["document mask, torch varlen"]["error"]
    assert report["precision"]["max_abs_diff"] < 0.05
    assert report["loss"]["chunked"]["loss_rel_diff"] < 1e-5 and "| chunked |" in result.stdout
    assert report["generate"]["batch 1"]["new_tokens_per_s"] > 0
    for way in ("folded", "grouped"):  # a new token's attention over the static cache
        assert report["generate"][f"decode attention {way}"]["rel_error"] < 1e-5
    assert "static cache: folded" in result.stdout
    assert "| recipe eager |" in result.stdout
    profile = recipe["profile"]  # one step by category, from the profiler's own events
    assert profile["ms_by_category"]["matmul"] > 0 and profile["matmul_tflops"] > 0
    assert 0 <= profile["idle_fraction"] < 1 and "profile of one step" in result.stdout


def test_gpu_check_variants_reach_the_recipe(tmp_path, monkeypatch):
    """Each gpu-check run variant's own arguments get into the recipe the Trainer reads (parsed
    by `tinyrecipe fit`'s parser): compiled-zero3 reshards, compiled-float8 turns float8 on."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    from tinyrecipe.cli.fit import parse_recipe

    s = gpu_check.settings(cpu=False)
    sources = [{"name": "synthetic", "train": str(tmp_path), "weight": 1.0}]
    recipes = {
        name: parse_recipe(gpu_check.recipe_args(s, name, tmp_path, sources))[0]
        for name in ("compiled", "compiled-zero3", "compiled-float8", "compiled-mb16")
    }
    strategy = {k: r["trainer"]["strategy"]["init_args"] for k, r in recipes.items()}
    assert strategy["compiled"]["reshard_after_forward"] is False  # the recipe's own
    assert strategy["compiled-zero3"]["reshard_after_forward"] is True
    assert strategy["compiled-zero3"]["reshard_after_backward"] is True
    assert [r["model"]["speed"]["float8"] for r in recipes.values()] == [False, False, True, False]
    assert recipes["compiled-mb16"]["data"]["init_args"]["batch_size"] == 2 * s["micro"]


def test_the_docs_fine_tuning_figures_are_the_scripts():
    """docs/quickstart.md and docs/interop.md state what benchmarks/quickstart_finetune.py
    measured by running the documented commands (docs/assets/quickstart-finetune.json)."""

    figures = json.loads((ROOT / "docs/assets/quickstart-finetune.json").read_text())
    full, lora = figures["full"], figures["lora"]
    assert full["command"] == "tinyrecipe fit --config recipes/finetune/quickstart-sft.yaml"
    assert lora["command"] == full["command"] + (
        " --model.lora.rank 8 --model.optimizer.lr 3e-3 --model.schedule.min_lr 3e-4"
    )
    quickstart = " ".join((ROOT / "docs/quickstart.md").read_text().split())
    interop = " ".join((ROOT / "docs/interop.md").read_text().split())
    before, after, tuned = (
        f"{full['val_loss_before']:.3f}",
        f"{full['val_loss_after']:.3f}",
        f"{lora['val_loss_after']:.3f}",
    )
    assert f"falls from {before} to {after} ({tuned} with LoRA" in quickstart
    assert f"goes from {before} to {tuned} with LoRA" in interop and f"against {after}" in interop
    assert f"200 steps, {full['seconds']} s on 2 cores" in quickstart

import json
import math

import pytest

from tinyrecipe.cli import main as cli_main
from tinyrecipe.planning.scaling import (
    CHINCHILLA,
    CostModel,
    LossFit,
    chinchilla_loss,
    chinchilla_optimal,
    chinchilla_tokens,
    cost_optimal,
    implied_inference_tokens,
    inference_optimal,
)

pytestmark = pytest.mark.fast  # make test-fast


def test_papers_worked_example_chinchilla_7b_quality_with_1e11_inference_tokens():
    """Sardana & Frankle: ~6.0B parameters on ~1.18x the Chinchilla-optimal data."""
    loss = chinchilla_loss(7e9)
    plan = inference_optimal(loss, 1e11)
    assert plan.n_params == pytest.approx(6.0e9, rel=0.02)
    assert plan.train_tokens / chinchilla_tokens(7e9) == pytest.approx(1.18, rel=0.02)


def test_no_inference_gives_chinchilla():
    for n in (1e8, 7e9, 7e10):
        plan = inference_optimal(chinchilla_loss(n), 0.0)
        assert plan.n_params == pytest.approx(n, rel=1e-6)
        assert plan.train_tokens == pytest.approx(chinchilla_tokens(n), rel=1e-6)


def test_closed_form_chinchilla_optimum_is_the_minimum_loss_for_its_compute():
    c = 1e22
    plan = chinchilla_optimal(c)
    assert plan.train_flops == pytest.approx(c)
    for factor in (0.8, 1.25):
        n = plan.n_params * factor
        assert CHINCHILLA.loss(n, c / (6 * n)) > plan.loss
    assert inference_optimal(plan.loss).n_params == pytest.approx(plan.n_params, rel=1e-6)


def test_more_inference_means_smaller_models_trained_longer():
    loss = chinchilla_loss(7e9)
    plans = [inference_optimal(loss, d) for d in (0, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14)]
    for a, b in zip(plans, plans[1:], strict=False):
        assert b.n_params < a.n_params and b.train_tokens > a.train_tokens
    for p in plans:  # each plan reaches the target
        assert p.loss == pytest.approx(loss, abs=1e-9)


def test_optimum_beats_its_neighbours():
    loss, d_inf = 2.2, 1e12
    best = inference_optimal(loss, d_inf)
    for factor in (0.97, 1.03):
        n = best.n_params * factor
        other = 6 * n * CHINCHILLA.tokens_for_loss(n, loss) + 2 * n * d_inf
        assert other > best.total_flops


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable: the fit's irreducible loss E is 1.69"):
        inference_optimal(1.69, 1e10)


def test_tinyllama_implied_demand_round_trips():
    n, d = 1_100_048_384, 3e12
    demand = implied_inference_tokens(n, d)
    plan = inference_optimal(CHINCHILLA.loss(n, d), demand)
    assert plan.n_params == pytest.approx(n, rel=1e-6) and plan.train_tokens == pytest.approx(
        d, rel=1e-6
    )
    with pytest.raises(ValueError, match="under-trained"):
        implied_inference_tokens(7e9, 1e10)


def test_cost_version_equals_flops_version_when_all_mfus_are_equal():
    model = CostModel(
        price_per_gpu_hour=2.0, peak_flops=1e15, mfu_train=0.4, mfu_input=0.4, mfu_output=0.4
    )
    plan, dollars = cost_optimal(2.2, 5e11, 5e11, model)
    flops = inference_optimal(2.2, 1e12)
    assert plan.n_params == pytest.approx(flops.n_params, rel=1e-6)
    assert dollars == pytest.approx(flops.total_flops / (1e15 * 0.4) / 3600 * 2.0, rel=1e-9)
    slow_decode = CostModel(2.0, 1e15, mfu_train=0.4, mfu_input=0.4, mfu_output=0.02)
    assert cost_optimal(2.2, 5e11, 5e11, slow_decode)[0].n_params < plan.n_params


def test_user_fit():
    fit = LossFit(E=1.8, A=500.0, B=400.0, alpha=0.34, beta=0.28)
    plan = inference_optimal(2.3, 1e11, fit)
    assert fit.loss(plan.n_params, plan.train_tokens) == pytest.approx(2.3)
    assert not math.isclose(plan.n_params, inference_optimal(2.3, 1e11).n_params, rel_tol=1e-3)


def test_plan_cli_json(capsys):
    assert (
        cli_main(["plan", "--chinchilla-params", "7e9", "--inference-tokens", "1e11", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    for key in (
        "n_params",
        "train_tokens",
        "train_flops",
        "inference_flops",
        "total_flops",
        "chinchilla_n_params",
        "chinchilla_train_tokens",
        "flops_saving",
        "tokens_per_param",
    ):
        assert key in out
    assert out["n_params"] == pytest.approx(6.0e9, rel=0.02)
    assert out["chinchilla_n_params"] == pytest.approx(7e9, rel=1e-6)
    assert 0 < out["flops_saving"] < 0.05
    assert out["total_flops"] == pytest.approx(out["train_flops"] + out["inference_flops"])


def test_plan_cli_table_and_errors(capsys):
    assert (
        cli_main(
            [
                "plan",
                "--target-loss",
                "2.2",
                "--inference-tokens",
                "1e12",
                "--price-per-gpu-hour",
                "2",
                "--gpu-peak-flops",
                "989e12",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "inference-aware optimum" in out and "cost optimum" in out
    assert cli_main(["plan", "--target-loss", "1.0"]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert cli_main(["plan", "--target-loss", "2.2", "--price-per-gpu-hour", "2"]) == 2


def test_pick_shape_recovers_tinyllama():
    from tinyrecipe.model import ModelConfig
    from tinyrecipe.planning.plan import pick_shape

    assert pick_shape(1_100_048_384) == ModelConfig.from_name("tinyllama-1.1b")
    for n in (1e8, 3e8, 7e9):
        shape = pick_shape(n)
        assert 64 <= shape.d_model / shape.n_layer <= 160, (n, shape)


def test_emit_takes_the_cost_optimum_with_a_price_and_says_a_far_shape(tmp_path, capsys):
    argv = ["plan", "--chinchilla-params", "7e9", "--inference-tokens", "1e13", "--json"]
    argv += ["--price-per-gpu-hour", "2", "--gpu-peak-flops", "989e12", "--mfu-output", "0.05"]
    assert cli_main([*argv, "--emit", str(tmp_path / "cost.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["cost"]["n_params"] / summary["n_params"] - 1) > 0.05  # they differ
    assert summary["recipe"]["n_params"] == pytest.approx(summary["cost"]["n_params"], rel=0.1)
    with pytest.warns(UserWarning, match="the nearest shape has"):
        cli_main(["plan", "--target-loss", "6", "--emit", str(tmp_path / "tiny.yaml")])  # 7.7M


def test_emit_writes_a_recipe_fit_accepts(tmp_path, capsys):
    import io
    from contextlib import redirect_stdout

    import yaml

    from tinyrecipe.model.config import resolve_config

    from .conftest import ROOT

    out = tmp_path / "planned.yaml"
    base = ROOT / "recipes/tinyllama-1.1b.yaml"
    code = cli_main(
        [
            "plan",
            "--chinchilla-params",
            "7e9",
            "--inference-tokens",
            "1e11",
            "--emit",
            str(out),
            "--base",
            str(base),
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(out), "--print_config"])
    recipe = yaml.safe_load(buf.getvalue())
    model = recipe["model"]
    config = resolve_config(model["preset"], model["config"])
    assert config.num_params() == pytest.approx(summary["n_params"], rel=0.02)
    tokens_per_step = summary["recipe"]["tokens_per_step"]
    # a 6B model: the estimate is fitted to 80 GiB per GPU, in the recipe's own directory
    assert summary["recipe"]["fits"] and summary["recipe"]["memory_per_device_gib"] <= 80
    assert recipe["trainer"]["default_root_dir"] == "out/planned"
    assert model["speed"]["activation_checkpointing"] or recipe["data"]["batch_size"] < 8
    assert tokens_per_step == 2_097_152
    steps = recipe["trainer"]["max_steps"]
    assert steps * tokens_per_step >= summary["train_tokens"] > (steps - 1) * tokens_per_step
    assert model["optimizer"]["lr"] == 4e-4  # everything else comes from the base recipe
    assert (
        cli_main(
            [
                "plan",
                "--target-loss",
                "2.2",
                "--emit",
                str(tmp_path / "x.yaml"),
                "--base",
                str(tmp_path / "missing.yaml"),
            ]
        )
        == 2
    )
    # nothing fits 8 GiB for a 6B model on 8 GPUs: said, not silently written
    with pytest.warns(UserWarning, match="no micro-batch fits 8 GiB"):
        cli_main(
            [
                "plan",
                "--chinchilla-params",
                "7e9",
                "--emit",
                str(tmp_path / "y.yaml"),
                "--gpu-memory-gib",
                "8",
            ]
        )


def test_readme_plot_script_runs(tmp_path):
    pytest.importorskip("matplotlib")
    import subprocess
    import sys

    from .conftest import ROOT

    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/plot_plan.py"), "--out", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert (
        "loss 2.1833" in out and "2.39e+13" in out and (tmp_path / "p.png").stat().st_size > 10_000
    )


def test_plan_with_a_fitted_law_says_when_it_extrapolates(tmp_path, capsys):
    law = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283}
    path = tmp_path / "law.json"
    path.write_text(json.dumps({"law": law, "points": [[1e6, 1e7, 5.0], [4e6, 4e7, 4.5]]}))
    assert cli_main(["plan", "--law", str(path), "--target-loss", "2.2"]) == 0
    assert "outside the sizes the law was fitted on (1e+06 to 4e+06)" in capsys.readouterr().err

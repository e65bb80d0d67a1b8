"""Training: recipes parse, `tinyrecipe fit` trains and logs, a killed run resumes bitwise, and
DDP / FSDP2 on 2 CPU processes match the single-process run."""

import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from tinyrecipe.cli import main as cli_main
from tinyrecipe.model import Llama

from .conftest import ROOT, tinyrecipe

RECIPES = (
    sorted((ROOT / "recipes").glob("*.yaml"))
    + sorted((ROOT / "recipes/finetune").glob("*.yaml"))
    + sorted((ROOT / "recipes/continue").glob("*.yaml"))
    + [ROOT / "recipes/ladder/base.yaml", ROOT / "recipes/ladder/cpu/base.yaml"]
)
ABLATIONS = sorted(p for p in (ROOT / "recipes/ablations").glob("*.yaml") if p.name != "base.yaml")


def print_config(*configs: Path, extra: tuple = ()) -> dict:
    args = (
        ["fit"]
        + [a for c in configs for a in ("--config", str(c))]
        + list(extra)
        + ["--print_config"]
    )
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(out.getvalue())
    # data is a class_path + init_args; flatten it back (the class is checked separately)
    config["data_class"] = config["data"]["class_path"]
    config["data"] = config["data"]["init_args"]
    return config


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.fast
def test_every_recipe_parses(recipe):
    config = print_config(recipe)
    assert config["model"]["preset"]
    assert config["data"].get("sources") or config["data_class"].endswith("SFTDataModule")


def test_quickstart_finetune_recipe_has_the_quickstart_models_shape():
    """`make quickstart`, then `tinyrecipe fit --config recipes/finetune/quickstart-sft.yaml`:
    its init_from must hold the model the recipe describes."""
    from tinyrecipe.model.config import SHAPE_FIELDS, resolve_config

    shapes = []
    for recipe in ("quickstart.yaml", "finetune/quickstart-sft.yaml"):
        model = print_config(ROOT / "recipes" / recipe)["model"]
        config = resolve_config(model["preset"], model["config"])
        shapes.append({k: getattr(config, k) for k in SHAPE_FIELDS})
    assert shapes[0] == shapes[1]


def test_ablations_read_the_quickstart_data_with_its_shape():
    """`make quickstart`, then the README's `tinyrecipe fit --config recipes/ablations/base.yaml
    --config recipes/ablations/mha.yaml`: the base reads the quickstart's data and tokenizer, so
    its vocabulary must be the quickstart tokenizer's (Makefile VOCAB)."""
    quickstart = print_config(ROOT / "recipes/quickstart.yaml")
    base = print_config(ROOT / "recipes/ablations/base.yaml")
    vocab = re.search(r"^VOCAB \?= (\d+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert base["model"]["config"]["vocab_size"] == int(vocab)
    assert quickstart["model"]["config"]["vocab_size"] == int(vocab)
    assert base["data"]["tokenizer_dir"] == quickstart["data"]["tokenizer_dir"]
    assert [s["train"] for s in base["data"]["sources"]] == [
        s["train"] for s in quickstart["data"]["sources"]
    ]


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda p: p.name)
def test_every_ablation_composes_with_its_base_and_changes_something(overlay):
    base = print_config(ROOT / "recipes/ablations/base.yaml")
    config = print_config(ROOT / "recipes/ablations/base.yaml", overlay)
    changed = {
        k
        for section in ("model", "data")
        for k in config[section]
        if config[section][k] != base[section][k]
    }
    assert changed, f"{overlay.name} changes nothing in model/data"
    assert config["trainer"]["max_steps"] == base["trainer"]["max_steps"]


def test_tinyllama_recipe_is_the_papers():
    config = print_config(ROOT / "recipes/tinyllama-1.1b.yaml")
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert config["global_batch_size"] == 1024 and 1024 * data["block_size"] == 2_097_152
    from tinyrecipe.cli.fit import accumulation

    assert accumulation(1024, data["batch_size"], trainer["devices"] * trainer["num_nodes"]) == 16
    assert trainer["max_steps"] == 1_430_512 and trainer["max_steps"] * 2_097_152 >= 3e12
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "tinyrecipe.train.strategy.FSDP2Strategy"
    # the weights gathered once per optimizer step (docs/training.md)
    assert not strategy["init_args"]["reshard_after_forward"]
    assert not strategy["init_args"]["reshard_after_backward"]
    assert model["speed"]["compile"] and model["speed"]["meta_init"]
    assert trainer["val_check_interval"] == 5000 * 16
    assert config["checkpoint"]["every_n_train_steps"] == 5000
    assert config["seed_everything"] == 3407
    optimizer, schedule = model["optimizer"], model["schedule"]
    assert (optimizer["lr"], schedule["min_lr"], schedule["warmup_steps"]) == (4e-4, 4e-5, 2000)
    assert tuple(optimizer["betas"]) == (0.9, 0.95) and optimizer["weight_decay"] == 0.1
    assert optimizer["decay_norms_and_embeddings"] and model["config"]["loss_chunk_size"] == 4096
    weights = {s["name"]: s["weight"] for s in data["sources"]}
    assert weights == {"slimpajama": 0.7, "starcoderdata": 0.3}
    assert "vocab_size" not in data  # linked from the model's config, never set twice
    from tinyrecipe.train.module import CausalLMModule

    module = CausalLMModule(**{k: v for k, v in model.items()})
    with torch.device("meta"):
        decoder = Llama(module.config)
    assert sum(p.numel() for p in decoder.parameters()) == 1_100_048_384


@pytest.mark.fast
def test_tinyllama_v11_stages_stack_into_the_cards_schedule():
    """stage1 + stage2 + stage3 parse as one recipe: 1.5T tokens of SlimPajama, Starcoder and
    Proof-Pile-2 entering at the end of stage 1 (a step boundary), ramping over 6B tokens,
    75/15/10 to 1.85T, then the 4x batch and the WSD decay ending at 2T tokens."""
    v11 = ROOT / "recipes/tinyllama-v1.1"
    files = [v11 / "stage1-basic.yaml", v11 / "stage2-math-code.yaml", v11 / "stage3-cooldown.yaml"]
    one, two, three = (print_config(*files[:n]) for n in (1, 2, 3))
    tokens = 896 * 2048
    assert (
        one["model"]["schedule"]["name"] == "constant"
        and one["trainer"]["max_steps"] * tokens >= 1.5e12
    )
    (stage,) = two["data"]["stages"]
    assert stage["start_tokens"] == one["trainer"]["max_steps"] * tokens  # where stage 1 ends
    assert stage["ramp_tokens"] == 6e9 and sum(stage["weights"].values()) == pytest.approx(1.0)
    assert stage["weights"]["slimpajama"] == 0.75
    assert two["trainer"]["max_steps"] * tokens == pytest.approx(1.85e12, rel=1e-5)
    model, trainer = three["model"], three["trainer"]
    # every stage keeps the flagship's strategy: the weights gathered once per optimizer step
    assert trainer["strategy"]["class_path"] == "tinyrecipe.train.strategy.FSDP2Strategy"
    assert not any(
        trainer["strategy"]["init_args"][f"reshard_after_{k}"] for k in ("forward", "backward")
    )
    assert three["global_batch_size"] == 4 * 896 and three["data"]["allow_global_batch_change"]
    assert two["trainer"]["max_steps"] % 4 == 0  # stage 3 starts on a whole batch of its own
    schedule = model["schedule"]
    assert schedule["name"] == "wsd" and schedule["decay_from"] == two["trainer"]["max_steps"]
    assert trainer["max_steps"] == schedule["decay_from"] + schedule["decay_steps"]
    end = two["trainer"]["max_steps"] * tokens + schedule["decay_steps"] * 4 * tokens
    assert end == pytest.approx(2e12, rel=1e-5) and end >= 2e12
    mini = [ROOT / f"recipes/tinyllama-v1.1/miniature/stage{n}.yaml" for n in (1, 2, 3)]
    assert print_config(*mini)["data"]["stages"][0]["start_tokens"] == 14 * 8 * 64


@pytest.mark.fast
def test_the_fsdp2_name_takes_strategy_options_on_the_command_line():
    """`--trainer.strategy fsdp2 --trainer.strategy.shard_group_size 8` (HSDP): the registered
    name becomes the class, whose options the parser knows."""
    config = print_config(
        ROOT / "recipes/quickstart.yaml",
        extra=("--trainer.strategy", "fsdp2", "--trainer.strategy.shard_group_size", "8"),
    )
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "tinyrecipe.train.strategy.FSDP2Strategy"
    assert strategy["init_args"]["shard_group_size"] == 8


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("fit", ("--trainer.max_stepz", "5"), "unrecognized arguments: --trainer.max_stepz"),
        ("fit", ("--trainer.max_steps", "many"), "max_steps"),
        ("fit", ("--model.preset", "gpt-5"), "unknown model preset 'gpt-5'"),
        ("fit", ("--model.config.n_kv_heads", "4"), "Option 'n_kv_heads' is not accepted"),
        ("fit", ("--optimizer", "Adam"), "unrecognized arguments: --optimizer"),
        (
            "fit",
            ("--model.config", "{n_layer:2}"),
            "value {n_layer:2} (a YAML mapping needs a space",
        ),
        ("fabric", ("--trainer.max_stepz", "5"), "unrecognized arguments: --trainer.max_stepz"),
        ("memory", ("--trainer.devicez", "5"), "unrecognized arguments: --trainer.devicez"),
    ],
)
@pytest.mark.fast
def test_bad_options_fail_in_one_line(command, extra, message):
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = cli_main([command, "--config", str(ROOT / "recipes/quickstart.yaml"), *extra])
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err.getvalue()
    assert "Traceback" not in err.getvalue() and "usage:" not in err.getvalue()


# ---- real runs on the small corpus (subprocesses, like a user) --------------------------------

MICRO = {
    "n_layer": 2,
    "d_model": 64,
    "n_head": 4,
    "n_kv_head": 2,
    "d_ff": 176,
    "vocab_size": 1024,
    "block_size": 64,
}


def write_recipe(
    tmp: Path, corpus, *, max_steps: int, every: int, batch_size: int = 4, workers: int = 0
) -> Path:
    root = corpus["root"]
    recipe = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": max_steps,
            "val_check_interval": every,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": -1,
            "log_every_n_steps": 1,
            "gradient_clip_val": 1.0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp),
        },
        "checkpoint": {"every_n_train_steps": every, "save_top_k": -1},
        "throughput": {"window_size": 2},
        "model": {
            "preset": "tiny",
            "config": MICRO,
            "optimizer": {"lr": 3e-3},
            "schedule": {"min_lr": 3e-4, "warmup_steps": 2},
        },
        "data": {
            "sources": [
                {
                    "name": "slimpajama",
                    "train": str(root / "slim/train"),
                    "validation": str(root / "slim/validation"),
                    "weight": 0.7,
                },
                {"name": "starcoderdata", "train": str(root / "star/train"), "weight": 0.3},
            ],
            "block_size": 64,
            "batch_size": batch_size,
            "num_workers": workers,
            "val_max_blocks": 16,
            "tokenizer_dir": str(root / "tok"),
        },
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fit(recipe: Path, *extra: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return tinyrecipe("fit", "--config", recipe, *extra, timeout=timeout, **env)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_logs_checkpoints_and_generates(corpus, tmp_path, capsys):
    recipe = write_recipe(tmp_path, corpus, max_steps=8, every=4)
    result = fit(recipe, "--data.document_mask", "true")  # packed documents masked apart
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(tmp_path / "tensorboard")
    for tag in (
        "train/loss",
        "train/grad_norm",
        "train/tokens_seen",
        "lr-AdamW",
        "val/loss",
        "val/ppl",
        "val/loss/slimpajama",
        "val/ppl/slimpajama",
        "train/device/items_per_sec",
        "train/device/mfu",  # against the CPU matmul peak measured at setup
    ):
        assert tag in logged, (tag, sorted(logged))
    assert logged["val/loss"][0][0] == 0  # the untrained model's evaluation is the first point
    assert logged["val/loss"][-1][1] < logged["val/loss"][0][1]
    assert (tmp_path / "checkpoints/last.ckpt").is_file() and not list(
        (tmp_path / "checkpoints").glob("*.tmp-*")
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyrecipe.cli",
            "generate",
            "--ckpt",
            str(tmp_path / "checkpoints/last.ckpt"),
            "--tokenizer",
            str(corpus["root"] / "tok"),
            "--prompt",
            "def ",
            "--prompt",
            "x = ",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    first, second = out.rstrip("\n").split("\n\nx = ")  # several prompts: one process
    assert first.startswith("def ")
    args = ["--ckpt", str(tmp_path / "checkpoints/last.ckpt"), "--tokenizer"]
    args += [str(corpus["root"] / "tok"), "--max-new-tokens", "8", "--prompt", "x = "]
    assert cli_main(["generate", *args]) == 0
    assert capsys.readouterr().out == "x = " + second + "\n"  # sampled as if alone


def test_a_float8_fit_checkpoints_and_generates(corpus, tmp_path, capsys):
    """The blocks' linear layers in float8 through fit (slow on CPU: 2 steps): the run says so,
    and its checkpoint (names unchanged) generates like any other."""
    recipe = write_recipe(tmp_path, corpus, max_steps=2, every=2)
    small = ["--data.val_max_blocks", "2", "--trainer.num_sanity_val_steps", "0"]
    result = fit(recipe, "--model.speed.float8", "true", *small)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear=float8" in result.stdout + result.stderr
    args = ["--ckpt", str(tmp_path / "checkpoints/last.ckpt"), "--tokenizer"]
    args += [str(corpus["root"] / "tok"), "--max-new-tokens", "4", "--prompt", "def "]
    assert cli_main(["generate", *args]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_speed_switches_train_like_the_reference(corpus, tmp_path):
    """Per-block compile (whole-graph, over checkpointed blocks), the chunked loss and the foreach
    AdamW give the plain run's losses, and the run says which paths it took."""
    plain = write_recipe(tmp_path / "plain", corpus, max_steps=4, every=100)
    assert fit(plain, "--trainer.callbacks", "[]").returncode == 0
    fast = write_recipe(tmp_path / "fast", corpus, max_steps=4, every=100)
    switches = json.dumps({**MICRO, "loss_chunk_size": 48})
    result = fit(
        fast,
        "--trainer.callbacks",
        "[]",
        "--model.speed.compile",
        "true",
        "--model.config",
        switches,
        "--model.optimizer.kernel",
        "foreach",
        "--model.speed.activation_checkpointing",
        "true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "attention=sdpa" in said and "compile=per-block" in said and "chunked(48)," in said
    assert "activation_checkpointing=True" in said
    assert "+compiled" not in said  # fp32 keeps the in-place loss kernel (bf16/fp16 compile it)
    one = scalars(tmp_path / "plain/tensorboard")["train/loss"]
    two = scalars(tmp_path / "fast/tensorboard")["train/loss"]
    assert len(one) == len(two) == 4
    for (s1, l1), (s2, l2) in zip(one, two, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4)


def test_fsdp1_is_refused_in_one_line():
    """Lightning's FSDPStrategy (FSDP1) would clip and reduce differently; the recipe uses fsdp2."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from tinyrecipe.train.module import CausalLMModule

    module = CausalLMModule(preset="tiny", config=MICRO)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="FSDPStrategy \\(FSDP1\\) is not supported; use 'fsdp2'"):
        module.build_model()


def test_a_run_directory_refuses_a_new_run_and_another_model_shape(corpus, tmp_path):
    """A run's records are refused, in one line and byte-identical afterwards (checkpoints, logs,
    the recipe's copy), to a new run started into its directory, to a resume with another model
    shape or LoRA setting, and to a --ckpt_path that does not exist (`last` before there is a
    checkpoint included); `--ckpt_path auto` starts the run, then resumes it."""
    recipe = write_recipe(tmp_path, corpus, max_steps=2, every=2)

    def refused(*args: str) -> str:  # in this process: each stops before the Trainer writes
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = cli_main(["fit", "--config", str(recipe), *args])
        assert code == 2 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
        return err.getvalue()

    assert "nothing to resume with --ckpt_path last" in refused("--ckpt_path", "last")  # none yet
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()
    first = fit(recipe, "--ckpt_path", "auto")  # nothing to resume: a new run
    assert first.returncode == 0 and "--ckpt_path auto: a new run" in first.stderr
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    assert "holds checkpoints of an earlier run" in refused()  # forgot --ckpt_path last
    other_shape = json.dumps({**MICRO, "n_layer": 3})
    said = refused("--ckpt_path", "last", "--model.config", other_shape)
    assert "checkpoint holds another model (n_layer 2 vs 3" in said
    said = refused("--ckpt_path", "last", "--model.lora.rank", "4")
    assert "checkpoint was trained with LoRA off, the recipe says rank 4" in said
    missing = tmp_path / "checkpoints/step=9.ckpt"
    assert f"checkpoint '{missing}' (--ckpt_path) does not exist" in refused(
        "--ckpt_path", str(missing)
    )
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no new events file, config.yaml, checkpoint or validation point
    resumed = fit(recipe, "--ckpt_path", "auto", "--trainer.max_steps", "3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"--ckpt_path auto: resuming from {tmp_path / 'checkpoints/last.ckpt'}" in resumed.stderr
    assert (tmp_path / "checkpoints/last.ckpt").resolve().name == "step=3.ckpt"
    assert len(list((tmp_path / "tensorboard").glob("version_*"))) == 0  # one log, continued


def test_progress_bar_counts_optimizer_steps(corpus, tmp_path):
    recipe = write_recipe(tmp_path, corpus, max_steps=3, every=100)
    result = fit(
        recipe, "--trainer.enable_progress_bar", "true", "--trainer.accumulate_grad_batches", "2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr
    assert "step: 100%" in shown and "3/3" in shown, shown[-3000:]
    assert "Epoch 0" not in shown
    assert "Total params" not in shown and "Tip:" not in shown  # the run's own line instead


def test_a_resumed_runs_progress_bar_counts_from_its_step():
    """Lightning sends no epoch start to a run resumed mid-epoch: the bar is set at train start."""
    from types import SimpleNamespace

    from tinyrecipe.train.callbacks import StepProgressBar

    bar = StepProgressBar()
    trainer = SimpleNamespace(max_steps=500, global_step=451, is_global_zero=True)
    bar._trainer = trainer
    bar.on_train_start(trainer, None)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (500, 451)
    bar.train_progress_bar.close()


@pytest.mark.fast
def test_throughput_times_each_step_when_the_device_has_done_it(monkeypatch):
    """The monitor never synchronises at a step's end: it records an event there and waits for
    it at the end of the next step; validation's start times the step still queued. Validation,
    a checkpoint save and downstream evaluation stop the clock until the next training batch."""
    from types import SimpleNamespace

    from tinyrecipe.train import callbacks

    finished = iter([10.0, 20.0, 30.0, 140.0, 350.0])  # when the device completes each step
    clock = iter([0.0, 30.0, 130.0, 140.0, 340.0, 360.0])  # the host's, at the pauses

    class Event:
        def __init__(self, device):
            self.done = next(finished)

        def wait(self):
            return self.done

    monkeypatch.setattr(callbacks, "DeviceEvent", Event)
    monitor = callbacks.TokenThroughputMonitor(window_size=2)
    logged = []
    micro = iter([True, False] * 5)  # 2 micro-batches a step
    trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(_should_accumulate=lambda: next(micro)),
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        precision="32-true",
        world_size=1,
        _logger_connector=SimpleNamespace(
            should_update_logs=True, log_metrics=lambda m, step=None: logged.append(m)
        ),
        sanity_checking=False,
    )
    trainer.callbacks = [monitor]
    module = SimpleNamespace(flops_per_batch=100.0)
    monitor.setup(trainer, module, "fit")
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monitor.on_train_start(trainer, module)
    monitor._t0 = 0.0  # the clock's start, as the events count it
    batch = {"input_ids": torch.zeros(4, 8)}
    for _ in range(2):
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
    assert logged == []  # step 1 queued, not yet waited for
    for _ in range(4):
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
    assert len(logged) == 2  # steps 1 and 2, each at its own completion, one step late
    assert logged[-1]["train/device/items_per_sec"] == pytest.approx(64 / 10)  # 2 x 32 in 10
    monitor.on_validation_start(trainer)  # times step 3, still queued
    assert len(logged) == 3 and logged[-1]["train/device/items_per_sec"] == pytest.approx(6.4)
    assert logged[-1]["train/device/batches_per_sec"] == pytest.approx(2 / 10)

    def step():  # 10 s of training after 100 s of validation, then 200 s of save and eval
        for _ in range(2):
            monitor.on_train_batch_start(trainer, module, batch, 0)
            monitor.on_train_batch_end(trainer, module, None, batch, 0)

    step()
    monitor.on_save_checkpoint(trainer, module, {})  # times step 4 at 140 - 100 s paused
    with callbacks.training_clock_paused(trainer):  # downstream evaluation: already paused
        pass
    step()
    monitor.on_validation_start(trainer)  # step 5 at 350 - 300 s paused
    assert len(logged) == 5 and all(m["train/device/items_per_sec"] == 6.4 for m in logged[3:])


def test_the_clis_callbacks_give_way_to_a_recipe_without_logger_or_checkpoints(corpus, tmp_path):
    """`trainer.logger: false` and `trainer.enable_checkpointing: false`: the CLI's learning-rate
    monitor (which needs a logger) and checkpoint callback give way; nothing is written."""
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    argv = ["fit", "--config", str(recipe), "--trainer.logger", "false"]
    argv += ["--trainer.enable_checkpointing", "false", "--trainer.num_sanity_val_steps", "0"]
    assert cli_main(argv) == 0
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "tensorboard").exists()

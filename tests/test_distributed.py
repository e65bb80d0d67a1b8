"""FSDP2 at scale, on 2 CPU processes: one gradient reduction and one gather of the weights per
optimizer step (the TinyLlama recipe's strategy), no collective beyond them, the same gradient norm as one process, an atomic sharded
checkpoint that survives kill -9, and a Fabric start-up that never holds the whole model."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import EVAL_LIMIT, ROOT
from tests.test_training import MICRO, scalars, write_recipe
from tinyrecipe.checkpoint import load_tinyrecipe_checkpoint
from tinyrecipe.cli import main as cli_main
from tinyrecipe.train.journal import read_journal

ACCUMULATE, STEPS = 4, 3
FSDP_MODULES = MICRO["n_layer"] + 1  # each decoder block and the root
LIGHTNING_MP = [
    "--trainer.strategy",
    "lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size",
    "2",
    "--trainer.strategy.tensor_parallel_size",
    "1",
]


COMMON = [
    "--trainer.accumulate_grad_batches",
    str(ACCUMULATE),
    "--trainer.num_sanity_val_steps",
    "0",
    # z-loss rides in the step's one all-reduce; the spike judgement needs no collective
    "--model.config.z_loss",
    "1e-3",
    "--model.guard.spike_sigma",
    "6",
    "--model.guard.spike_window",
    "2",
]
# the TinyLlama recipe's strategy: the weights gathered once per optimizer step
FSDP2_RECIPE = [
    "--trainer.devices",
    "2",
    "--trainer.strategy",
    "tinyrecipe.train.strategy.FSDP2Strategy",
    "--trainer.strategy.reshard_after_forward",
    "false",
    "--trainer.strategy.reshard_after_backward",
    "false",
]
# 2 replicas x 2 shards: fully_shard over a (replicate, shard) mesh
HSDP = [
    "--trainer.devices",
    "4",
    "--trainer.strategy",
    "tinyrecipe.train.strategy.FSDP2Strategy",
    "--trainer.strategy.shard_group_size",
    "2",
]


def counted_fit(root, *flags, env=None) -> subprocess.CompletedProcess:
    """The fit parser and Trainer with every collective counted per optimizer step."""
    script = ROOT / "tests/helpers/counted_fit.py"
    cmd = [
        sys.executable,
        str(script),
        str(root / "counts.json"),
        "--config",
        str(root / "recipe.yaml"),
    ]
    import os

    return subprocess.run(
        [*cmd, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
    )


def counts(root, world: int) -> list[list[dict]]:
    return [json.loads((root / f"counts.json.rank{r}").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One recipe (accumulation 4, 3 steps, a checkpoint only at the end) run three ways: one
    process; two with tinyrecipe's fsdp2; two with Lightning's plain ModelParallelStrategy."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    common = COMMON
    out = {}
    for name, batch, flags in (
        ("one", 4, ["--trainer.val_check_interval", str(ACCUMULATE)]),  # validates every step
        ("fsdp2", 2, FSDP2_RECIPE),
        ("lightning", 2, ["--trainer.devices", "2", *LIGHTNING_MP]),
        (
            "hsdp",
            1,
            [*HSDP, "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"],
        ),
        # the recipe's strategy logging every other step: the steps between read nothing
        ("fsdp2-log2", 2, [*FSDP2_RECIPE, "--trainer.log_every_n_steps", "2"]),
    ):
        root = write_recipe(
            tmp / name, corpus, max_steps=STEPS, every=1000, batch_size=batch
        ).parent
        result = counted_fit(root, *common, *flags)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        out[name] = root
    return out


def test_one_gradient_reduction_one_gather_and_one_all_reduce_per_step(runs):
    for rank in counts(runs["fsdp2"], 2):
        assert len(rank) == STEPS
        for step in rank[1:]:  # the first step also holds the setup's collectives
            scatters = sum(v for k, v in step.items() if k.startswith("reduce_scatter"))
            assert scatters == FSDP_MODULES, step  # once per sharded module, not per micro-batch
            gathers = sum(v for k, v in step.items() if k.startswith("all_gather"))
            assert gathers == FSDP_MODULES, step  # the weights kept gathered through the step
            assert step.get("all_reduce") == 1, step  # the step's norm + loss
            assert step.get("broadcast") == 1, step  # Lightning's SIGTERM check, once per step
            sharding = ("reduce_scatter", "all_gather", "all_reduce", "broadcast")
            assert {k: v for k, v in step.items() if not k.startswith(sharding)} == {}, step
    # Lightning's own ModelParallelStrategy reduces on every micro-batch and gathers each
    # module's weights for every forward and every backward: the counts see it
    for step in counts(runs["lightning"], 2)[0][1:]:
        scatters = sum(v for k, v in step.items() if k.startswith("reduce_scatter"))
        gathers = sum(v for k, v in step.items() if k.startswith("all_gather"))
        assert scatters == ACCUMULATE * FSDP_MODULES and gathers == ACCUMULATE * 2 * FSDP_MODULES


def test_no_host_reads_between_logging_steps(runs):
    """2-process FSDP2 with accumulation, logging every other step: a step that does not log
    reads no tensor on the host (each read a device sync on a GPU: `.item()`, `float()`,
    `.tolist()`, ...); Lightning's SIGTERM check and the metrics' reads come with logging steps
    only, and the non-finite flag is read from a host copy made a step earlier."""
    for rank in range(2):
        steps = json.loads((runs["fsdp2-log2"] / f"counts.json.reads.rank{rank}").read_text())
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        assert [s["logging"] for s in steps] == [False, True, False]
        for step in steps:
            if not step["logging"]:
                assert step["reads"] == [], step
        assert any(step["reads"] for step in steps if step["logging"])  # the counter counts
    for rank in counts(runs["fsdp2-log2"], 2):
        assert rank[1] == {k: v for k, v in rank[1].items() if k != "broadcast"}  # no check yet
        assert rank[2].get("broadcast") == 1  # after the step-2 logs


def test_no_sync_accumulation_trains_like_synced_and_like_one_process(runs):
    """fp32 sums in another order (4 local micro-batches then 2 ranks, against 4 reductions of
    2 ranks, against 4 micro-batches of 4 rows on one process): measured up to 1.7e-6 apart,
    so 5e-6 here (without accumulation test_training holds the norm to 1e-6)."""
    one, two, synced = (scalars(runs[n] / "tensorboard") for n in ("one", "fsdp2", "lightning"))
    assert [v for _, v in two["train/spike_skips"]] == [0.0] * STEPS
    assert [s for s, _ in two["lr-AdamW"]] == list(range(STEPS))  # once a step, not per micro-batch
    for tag in ("train/loss", "train/grad_norm", "train/z_loss"):
        for (s1, a), (s2, b), (_, c) in zip(one[tag], two[tag], synced[tag], strict=True):
            assert (
                s1 == s2 and b == pytest.approx(a, rel=5e-6) and b == pytest.approx(c, rel=5e-6)
            ), tag
    _, mine = load_tinyrecipe_checkpoint(runs["fsdp2"] / "checkpoints/last.ckpt")
    _, theirs = load_tinyrecipe_checkpoint(runs["lightning"] / "checkpoints/last.ckpt")
    for name, tensor in mine.items():
        # fp32 sums in another order (4 local micro-batches, then the ranks), through AdamW
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-5)


def test_hsdp_on_four_processes_trains_like_one_and_resumes_exactly(runs, corpus, tmp_path):
    """2 replicas x 2 shards (HSDP) with accumulation 4: the losses and gradient norms of one
    process (fp32 reduction order: 5e-6), one reduce-scatter per sharded module and step inside
    the shard group; `--ckpt_path last` with the newest sharded checkpoint damaged (a shard cut
    in half) falls back to step 2 in one line, and the last step's weights are bitwise those of
    the uninterrupted run."""
    one, hsdp = (scalars(runs[n] / "tensorboard") for n in ("one", "hsdp"))
    for tag in ("train/loss", "train/grad_norm"):
        for (s1, a), (s2, b) in zip(one[tag], hsdp[tag], strict=True):
            assert s1 == s2 and b == pytest.approx(a, rel=5e-6), tag
    for rank in counts(runs["hsdp"], 4):
        for step in rank[1:]:
            scatters = sum(v for k, v in step.items() if k.startswith("reduce_scatter"))
            assert scatters == FSDP_MODULES, step
    ckpts = runs["hsdp"] / "checkpoints"
    resumed = write_recipe(tmp_path, corpus, max_steps=STEPS, every=1000, batch_size=1).parent
    shutil.copytree(ckpts, resumed / "checkpoints", symlinks=True)  # mtimes kept
    assert (resumed / "checkpoints/last.ckpt").resolve().name == f"step={STEPS}.ckpt"
    shard = sorted((resumed / f"checkpoints/step={STEPS}.ckpt").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = counted_fit(resumed, *COMMON, *HSDP, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "is unreadable" in line]
    assert len(said) == 1 and f"'step={STEPS}.ckpt/{shard.name}' is cut short" in said[0], said
    assert "'step=2.ckpt' (step 2)" in said[0]
    (start,) = [e for e in read_journal(resumed) if e["event"] == "start"]
    assert (start["why"], start["step"]) == ("fall-back", 2)
    assert start["resumed_from"].endswith("step=2.ckpt") and "cut short" in start["unreadable_why"]
    _, want = load_tinyrecipe_checkpoint(ckpts / f"step={STEPS}.ckpt")
    _, got = load_tinyrecipe_checkpoint(resumed / "checkpoints/last.ckpt")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_sharded_checkpoint_exports_to_hugging_face_with_equal_logits(runs, tmp_path):
    """The 2-process FSDP2 run's sharded directory: its weights are the one-process run's (fp32
    order), and `convert to-hf` gives a LlamaForCausalLM with our logits."""
    from transformers import AutoModelForCausalLM

    from tinyrecipe.interop.convert import to_hf
    from tinyrecipe.model import Llama

    ckpt = runs["fsdp2"] / "checkpoints/last.ckpt"
    assert ckpt.is_dir()
    config, state = load_tinyrecipe_checkpoint(ckpt)
    _, single = load_tinyrecipe_checkpoint(runs["one"] / "checkpoints/last.ckpt")
    assert state.keys() == single.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, single[name], atol=1e-5, rtol=1e-4)
    to_hf(ckpt, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = Llama(config).eval()
    ours.load_state_dict(state)
    idx = torch.randint(0, MICRO["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx).logits, atol=1e-5, rtol=0)


def test_a_sharded_checkpoint_resumed_wrongly_is_one_line(runs, tmp_path):
    """Given to a one-file strategy (fit's checkpoint I/O, the Fabric loop under DDP) or to a
    recipe of another shape: refused before anything loads, naming what to do."""
    from types import SimpleNamespace

    from tinyrecipe.checkpoint import AtomicCheckpointIO
    from tinyrecipe.model.config import ModelConfig
    from tinyrecipe.train.fabric import _load

    ckpt = runs["fsdp2"] / "checkpoints/last.ckpt"
    with pytest.raises(ValueError, match="is sharded .* trainer.strategy: fsdp2"):
        AtomicCheckpointIO().load_checkpoint(ckpt)
    ddp = SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match="is sharded"):
        _load(ddp, str(ckpt), {}, ModelConfig(**MICRO))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(ddp, str(tmp_path / "none.ckpt"), {}, ModelConfig(**MICRO))
    from lightning.fabric.strategies import ModelParallelStrategy

    fsdp2 = SimpleNamespace(strategy=ModelParallelStrategy(lambda m, _: m))
    with pytest.raises(ValueError, match="holds another model .n_layer 2 vs 3"):
        _load(fsdp2, str(ckpt), {}, ModelConfig(**{**MICRO, "n_layer": 3}))


@pytest.mark.faults
def test_kill_during_a_sharded_save_resumes_bitwise(runs, corpus, eval_task, tmp_path):
    """Both ranks die while writing the step-3 checkpoint; the step-2 one stays whole. The run
    validates after every step with the weights kept gathered (the recipe's flags): validation
    sees each step's new weights (its losses are one process's) and changes no training weight.
    At the end both ranks score downstream tasks together (requests split, forwards in step,
    generation too): the scores of `tinyrecipe eval` of the final checkpoint in one process."""
    root = write_recipe(tmp_path / "run", corpus, max_steps=STEPS, every=1000, batch_size=2).parent
    # the settings of runs["fsdp2"], compared with below, validating every step like runs["one"]
    flags = [*COMMON, *FSDP2_RECIPE, "--checkpoint.every_n_train_steps", "2"]
    flags += ["--trainer.val_check_interval", str(ACCUMULATE)]
    tasks = "stdlib_mc,stdlib_gen"  # log-likelihoods, and greedy generation in lockstep
    flags += ["--downstream_eval.tasks", tasks, "--downstream_eval.every_n_steps", "1000"]
    flags += ["--downstream_eval.limit", str(EVAL_LIMIT)]
    flags += ["--downstream_eval.include_path", str(eval_task)]
    killed = counted_fit(root, *flags, env={"TINYRECIPE_KILL_AT": "checkpoint.write:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = root / "checkpoints/last.ckpt"
    assert last.resolve().name == "step=2.ckpt" and (last / ".metadata").is_file()
    resumed = counted_fit(root, *flags, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((root / "checkpoints").glob(".*tmp*")), "a killed save left its directory"
    _, want = load_tinyrecipe_checkpoint(runs["fsdp2"] / "checkpoints/last.ckpt")
    _, got = load_tinyrecipe_checkpoint(last)
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name
    val = dict(scalars(root / "tensorboard")["val/loss"])  # the resumed run logs step 3 again
    reference = dict(scalars(runs["one"] / "tensorboard")["val/loss"])
    assert sorted(val) == sorted(reference) and len(val) == STEPS, (val, reference)
    for step, loss in reference.items():
        assert val[step] == pytest.approx(loss, rel=5e-6), step
    logged = scalars(root / "tensorboard")
    # at the end of training, after the final save: the resumed run's (the killed one died in it)
    assert [s for s, _ in logged["eval/stdlib_mc/acc"]] == [STEPS]
    out = tmp_path / "scores.json"
    tok = ["--tokenizer", str(corpus["root"] / "tok"), "--include-path", str(eval_task)]
    args = ["eval", "--ckpt", str(last), *tok, "--tasks", tasks, "--limit", str(EVAL_LIMIT)]
    assert cli_main([*args, "--json", str(out)]) == 0
    scores = json.loads(out.read_text())["results"]
    for task, metric in (("mc", "acc"), ("mc", "acc_norm"), ("gen", "fingerprint")):
        expected = scores[f"stdlib_{task}"][metric]
        values = [v for _, v in logged[f"eval/stdlib_{task}/{metric}"]]
        assert values == pytest.approx([expected]), (task, metric)


FABRIC_STARTUP = """
import json, resource, sys
import lightning as L
from tinyrecipe.train.fabric import Decoder, _strategy
from tinyrecipe.train.settings import ModelSettings

settings = ModelSettings("llama-160m", speed={"meta_init": True})
fabric = L.Fabric(accelerator="cpu", devices=2, strategy=_strategy("fsdp2", settings, "32-true"))
fabric.launch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
holder = fabric.setup(Decoder())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shard = sum(p.to_local().numel() * 4 for p in holder.model.parameters())
open(sys.argv[1] + str(fabric.global_rank), "w").write(json.dumps([before * 1024, after * 1024, shard]))
"""


def test_fabric_fsdp2_startup_never_holds_the_whole_model(tmp_path):
    """llama-160m: 629 MB of fp32 weights whole, 315 MB per rank sharded."""
    script = tmp_path / "startup.py"
    script.write_text(FABRIC_STARTUP)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rss")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    whole = 157_118_208 * 4
    for rank in range(2):
        before, after, shard = json.loads((tmp_path / f"rss{rank}").read_text())
        assert shard == pytest.approx(whole / 2, rel=0.01)
        assert after - before < 0.75 * whole, (after - before, whole)  # the shard, not the model

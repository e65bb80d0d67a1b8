"""Downstream evaluation on lm-evaluation-harness: the same per-request log-likelihoods and scores
as lm-eval's own HFLM on the exported model, the offline sample task, bad input as one line, and
evaluation inside training equal to `tinyrecipe eval` of the same step's checkpoint."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import EVAL_LIMIT as LIMIT
from tests.conftest import ROOT
from tests.test_training import MICRO, scalars, write_recipe
from tinyrecipe.checkpoint import save_tinyrecipe_checkpoint
from tinyrecipe.cli import main as cli_main
from tinyrecipe.data.tokenizer import load_tokenizer
from tinyrecipe.evaluation import TinyRecipeLM, evaluate, task_manager
from tinyrecipe.interop.convert import to_hf
from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.train.callbacks import DownstreamEval

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    """A random micro model with non-trivial norms, as a checkpoint and as a HF directory."""
    tmp = tmp_path_factory.mktemp("model")
    config = ModelConfig(**{**MICRO, "block_size": 256})
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    save_tinyrecipe_checkpoint(config, model.state_dict(), tmp / "model.ckpt")
    to_hf(tmp / "model.ckpt", tmp / "hf", tokenizer_dir=corpus["root"] / "tok")
    return model.eval(), tmp


def test_sample_task_is_four_way_multiple_choice_on_held_out_text(eval_task):
    docs = [json.loads(line) for line in (eval_task / "stdlib_mc.jsonl").read_text().splitlines()]
    assert len(docs) >= 20 and all(len(d["choices"]) == 4 and d["label"] in range(4) for d in docs)
    assert all(len(set(d["choices"])) == 4 for d in docs)
    labels = [d["label"] for d in docs]
    assert len(set(labels)) > 1  # the answer is not always in one place
    assert "stdlib_mc" in task_manager(eval_task, ["stdlib_mc"]).all_tasks


def test_scores_under_two_filters_keep_both_names():
    """gsm8k reports exact_match under strict-match and flexible-extract: both are kept."""
    from tinyrecipe.evaluation import _row, flat_metrics

    row = _row(
        {
            "exact_match,strict-match": 0.2,
            "exact_match_stderr,strict-match": "N/A",
            "exact_match,flexible-extract": 0.75,
            "acc,none": 0.5,
            "sample_len": 5,
            "alias": "gsm8k",
        }
    )
    assert row == {
        "exact_match/strict-match": 0.2,
        "exact_match/flexible-extract": 0.75,
        "acc": 0.5,
        "exact_match/strict-match_stderr": pytest.approx((0.2 * 0.8 / 4) ** 0.5),
        "exact_match/flexible-extract_stderr": pytest.approx((0.75 * 0.25 / 4) ** 0.5),
        "acc_stderr": pytest.approx((0.5 * 0.5 / 4) ** 0.5),
    }
    assert set(flat_metrics({"results": {"gsm8k": row}})) == {
        "eval/gsm8k/exact_match/strict-match",
        "eval/gsm8k/exact_match/flexible-extract",
        "eval/gsm8k/acc",
    }


def test_a_task_manager_is_reused_until_a_file_under_it_changes(tmp_path, monkeypatch):
    import lm_eval.tasks

    from tinyrecipe import evaluation as module

    built = []
    monkeypatch.setattr(
        lm_eval.tasks,
        "TaskManager",
        lambda include_path, include_defaults: built.append(1) or object(),
    )
    module._task_manager.cache_clear()
    first = module.task_manager(tmp_path)
    assert module.task_manager(tmp_path) is first and len(built) == 1
    (tmp_path / "group").mkdir()
    assert module.task_manager(tmp_path) is not first and len(built) == 2
    task = tmp_path / "group" / "new_task.yaml"  # added in a subdirectory, then edited
    task.write_text("task: new_task\n")
    assert len({id(module.task_manager(tmp_path)) for _ in range(2)}) == 1 and len(built) == 3
    task.write_text("task: renamed\n")
    os.utime(task, ns=(0, task.stat().st_mtime_ns + 1))  # however coarse the clock
    module.task_manager(tmp_path)
    assert len(built) == 4
    module._task_manager.cache_clear()


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_same_loglikelihoods_and_scores_as_hflm(exported, corpus, eval_task, bos):
    from lm_eval.models.huggingface import HFLM

    model, tmp = exported
    ours = TinyRecipeLM(
        model, load_tokenizer(corpus["root"] / "tok"), batch_size=4, add_bos_token=bos
    )
    hf = HFLM(
        pretrained=str(tmp / "hf"), batch_size=4, device="cpu", dtype="float32", add_bos_token=bos
    )
    task = task_manager(eval_task, ["stdlib_mc"]).load_task_or_group(["stdlib_mc"])["stdlib_mc"]
    task.build_all_requests(limit=LIMIT)
    requests = task.instances
    a, b = ours.loglikelihood(requests), hf.loglikelihood(requests)
    assert len(a) == len(b) == 4 * LIMIT
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    scores = [evaluate(lm, "stdlib_mc", limit=LIMIT, include_path=eval_task) for lm in (ours, hf)]
    assert scores[0]["results"]["stdlib_mc"]["acc"] == scores[1]["results"]["stdlib_mc"]["acc"]
    assert (
        scores[0]["results"]["stdlib_mc"]["acc_norm"]
        == scores[1]["results"]["stdlib_mc"]["acc_norm"]
    )
    if bos:  # the JSON's standard errors (docs/evaluation.md) and the table's every metric
        from tinyrecipe.evaluation import table

        mc = scores[0]["results"]["stdlib_mc"]
        p = mc["acc"]
        assert mc["acc_stderr"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5)
        shown = table(scores[0]["results"])
        assert "| stdlib_mc | acc |" in shown and "| stdlib_mc | acc_norm |" in shown
        assert f"| {100 * mc['acc_stderr']:.2f} |" in shown


def test_rolling_and_generation_match_hflm(exported, corpus):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tmp = exported
    ours = TinyRecipeLM(model, load_tokenizer(corpus["root"] / "tok"), batch_size=2)
    hf = HFLM(
        pretrained=str(tmp / "hf"), batch_size=2, device="cpu", dtype="float32", max_length=256
    )
    text = "def main():\n    return 42\n" * 40  # longer than the context: several windows
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        hf.loglikelihood_rolling(rolling)[0], abs=1e-3
    )
    until = [
        Instance("generate_until", {}, ("def f(x):", {"until": ["\n\n"], "max_gen_toks": 12}), 0)
    ]
    assert ours.generate_until(until) == hf.generate_until(until)


def test_generation_ends_at_eos_however_far_it_ran(exported, corpus, monkeypatch):
    """Under several processes every rank generates all `max_gen_toks` (a sharded model steps
    together): the text still ends where the model said EOS, as in one process."""
    from lm_eval.api.instance import Instance

    from tinyrecipe import evaluation as module

    model, _ = exported
    tok = load_tokenizer(corpus["root"] / "tok")
    words = tok.encode(" return x")

    def past_eos(model, idx, new, **kwargs):
        return torch.tensor([idx[0].tolist() + words + [tok.eos_id] + words])

    monkeypatch.setattr(module, "generate", past_eos)
    request = Instance("generate_until", {}, ("def f(x):", {"until": ["\n\n"]}), 0)
    assert TinyRecipeLM(model, tok).generate_until([request]) == [tok.decode(words)]


def test_every_rank_decodes_the_longest_generation_of_its_pass(exported, corpus, monkeypatch):
    """One pass's requests may ask for different max_gen_toks on two ranks (two generative tasks):
    both decode the larger, so their forward passes stay in step; each keeps its own length."""
    from lm_eval.api.instance import Instance

    from tinyrecipe import evaluation as module

    model, _ = exported
    tok = load_tokenizer(corpus["root"] / "tok")
    words, asked = tok.encode(" return x") * 8, []

    def decode(model, idx, new, **kwargs):
        asked.append(new)
        return torch.tensor([idx[0].tolist() + words[:new]])

    monkeypatch.setattr(module, "generate", decode)
    lm = TinyRecipeLM(model, tok)
    lm._world_size = 2
    # the other rank: as many requests (1), a request asking for 7 tokens where this asks for 2
    monkeypatch.setattr(lm, "_max_over_ranks", lambda mine: {2: 7}.get(mine, mine))
    request = Instance("generate_until", {}, ("def f(x):", {"until": [], "max_gen_toks": 2}), 0)
    assert lm.generate_until([request]) == [tok.decode(words[:2])] and asked == [7]


def error_line(capsys, *argv) -> str:
    assert cli_main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyrecipe eval: error: "), err
    return err[0]


def test_bad_input_is_one_line(exported, corpus, eval_task, tmp_path, capsys):
    _, tmp = exported
    base = ["eval", "--ckpt", tmp / "model.ckpt", "--tokenizer", corpus["root"] / "tok"]
    line = error_line(capsys, *base, "--tasks", "stdlib_mcq", "--include-path", eval_task)
    assert "unknown task 'stdlib_mcq'; did you mean stdlib_mc" in line
    # an unknown name was looked up among lm-eval's tasks too (the manager is cached); a task of
    # the user's own directory indexes that directory alone; a group of lm-eval's tasks, all
    full = task_manager(eval_task, ["stdlib_mcq"])
    own = task_manager(eval_task, ["stdlib_mc"])
    assert "stdlib_mc" in own.all_tasks and "hellaswag" not in own.all_tasks
    assert task_manager(eval_task, ["tinyllama-commonsense"]) is full
    assert {"stdlib_mc", "hellaswag", "tinyllama-commonsense"} <= set(full.all_tasks)
    assert "must be a positive" in error_line(capsys, *base, "--tasks", "stdlib_mc", "--limit", "0")
    assert "not a device" in error_line(capsys, *base, "--tasks", "stdlib_mc", "--device", "tpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text(
        "task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nonexistent.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    line = error_line(capsys, *base, "--tasks", "broken", "--include-path", bad)
    assert "task 'broken' cannot load its data" in line
    assert "task 'arc_easy' cannot load its data" in error_line(
        capsys, *base, "--tasks", "arc_easy"
    )
    other = ModelConfig(**{**MICRO, "vocab_size": 2048})
    save_tinyrecipe_checkpoint(other, Llama(other).state_dict(), tmp_path / "other.ckpt")
    line = error_line(
        capsys,
        "eval",
        "--ckpt",
        tmp_path / "other.ckpt",
        "--tokenizer",
        corpus["root"] / "tok",
        "--tasks",
        "stdlib_mc",
        "--include-path",
        eval_task,
    )
    assert "2048" in line and "1024" in line
    with pytest.raises(ValueError, match=r"downstream_eval.every_n_steps is -1; .* or 0 to score"):
        DownstreamEval(tasks="stdlib_mc", every_n_steps=-1)


def test_eval_in_training_equals_eval_of_the_checkpoint(corpus, eval_task, tmp_path):
    """Scored at the start, every 3 steps and at the end (step 4); the last score equals
    `tinyrecipe eval` of the final checkpoint."""
    recipe = write_recipe(tmp_path, corpus, max_steps=4, every=4)
    result = subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", "fit", "--config", str(recipe)]
        + ["--downstream_eval.tasks", "stdlib_mc", "--downstream_eval.every_n_steps", "3"]
        + ["--downstream_eval.limit", str(LIMIT), "--downstream_eval.include_path", str(eval_task)]
        + ["--downstream_eval.at_start", "true"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "downstream eval at step 0" in result.stderr
        and "downstream eval at step 4" in result.stderr
    )
    logged = scalars(tmp_path / "tensorboard")
    assert [s for s, _ in logged["eval/stdlib_mc/acc"]] == [0, 3, 4]
    out = tmp_path / "scores.json"
    code = cli_main(
        [
            "eval",
            "--ckpt",
            str(tmp_path / "checkpoints/last.ckpt"),
            "--tokenizer",
            str(corpus["root"] / "tok"),
        ]
        + [
            "--tasks",
            "stdlib_mc",
            "--limit",
            str(LIMIT),
            "--include-path",
            str(eval_task),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    scores = json.loads(out.read_text())["results"]["stdlib_mc"]
    assert logged["eval/stdlib_mc/acc"][-1][1] == pytest.approx(scores["acc"])
    assert logged["eval/stdlib_mc/acc_norm"][-1][1] == pytest.approx(scores["acc_norm"])


def test_the_fabric_loop_evaluates_from_the_same_recipe_key(corpus, eval_task, tmp_path):
    """`every_n_steps: 0`: the final weights only, as `fit` always scores them."""
    recipe = write_recipe(tmp_path, corpus, max_steps=2, every=100)
    result = subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", "fabric", "--config", str(recipe)]
        + ["--downstream_eval.tasks", "stdlib_mc", "--downstream_eval.every_n_steps", "0"]
        + ["--downstream_eval.limit", str(LIMIT), "--downstream_eval.include_path", str(eval_task)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(tmp_path / "fabric")
    assert [s for s, _ in logged["eval/stdlib_mc/acc"]] == [2]


def test_evaluation_runs_after_its_steps_checkpoint_and_waits_out_a_requeue(
    corpus, tmp_path, monkeypatch
):
    """Each step's evaluation finds that step's checkpoint on disk, the final one included; a run
    stopping for a SLURM requeue does not evaluate, and the step due is in its checkpoint."""
    from tinyrecipe.train import callbacks

    scored = []

    def run(self, trainer, pl_module):
        ckpt = tmp_path / f"checkpoints/step={trainer.global_step}.ckpt"
        scored.append((trainer.global_step, ckpt.is_file()))
        self._last_step = trainer.global_step

    monkeypatch.setattr(callbacks.DownstreamEval, "on_fit_start", lambda *args: None)
    monkeypatch.setattr(callbacks.DownstreamEval, "run", run)
    recipe = write_recipe(tmp_path, corpus, max_steps=5, every=2)
    argv = ["fit", "--config", str(recipe), "--downstream_eval.tasks", "stdlib_mc"]
    assert cli_main([*argv, "--downstream_eval.every_n_steps", "2"]) == 0
    assert scored == [(2, True), (4, True), (5, True)]

    evaluation = callbacks.DownstreamEval(tasks="stdlib_mc", every_n_steps=2)
    requeue = callbacks.SlurmRequeue()
    requeue.stopping = True
    trainer = SimpleNamespace(global_step=4, callbacks=[evaluation, requeue])
    evaluation.load_state_dict({"due": 4})
    evaluation.on_train_end(trainer, None)
    assert scored[3:] == [] and evaluation.state_dict() == {"due": 4}
    evaluation.on_train_batch_start(trainer, None)  # the resumed run's first batch
    assert [step for step, _ in scored[3:]] == [4] and evaluation.state_dict() == {"due": None}
    # a requeue signal at the last step: no requeue stop, the run ends and its weights are scored
    last = SimpleNamespace(
        global_step=10, max_steps=10, log_every_n_steps=1, checkpoint_callback=None
    )
    last.callbacks, last.fit_loop = [evaluation, requeue], SimpleNamespace(_should_accumulate=bool)
    requeue.stopping, requeue.active, requeue.requested = False, True, True
    requeue.on_train_batch_end(last, None)
    assert not requeue.stopping
    evaluation.on_train_end(last, None)
    assert [step for step, _ in scored[4:]] == [10]
    off = callbacks.DownstreamEval(tasks=None)  # evaluation turned off for the resume
    off.load_state_dict({"due": 4})
    off.on_train_batch_start(trainer, None)
    assert len(scored) == 5 and off.state_key != evaluation.state_key

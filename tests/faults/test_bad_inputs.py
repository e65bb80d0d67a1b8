"""docs/reliability.md's bad-input table, row by row: each input gives a one-line error naming the file or
key and the fix, or a counted skip; never a bare traceback, never partial output left behind.
`test_docs_table_matches_these_tests` keeps the table and this file in step."""

import json
import re
import subprocess
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, quiet_trainer, script, tinyrecipe
from tests.test_data import write_zst
from tests.test_training import MICRO, write_recipe

pytestmark = pytest.mark.faults

GOOD = json.dumps({"text": "a fine document", "meta": {"redpajama_set_name": "RedPajamaC4"}})


def prep_slim(tmp_path, corpus, lines: list[bytes], name="a.jsonl.zst", cut: int = 0):
    """Run the real prep script on a train split holding `lines` (validation: one good line)."""
    path = write_zst(tmp_path / "in/train" / name, lines)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    write_zst(tmp_path / "in/validation/v.jsonl.zst", [GOOD.encode()])
    return prep(tmp_path, corpus, "prepare_slimpajama.py")


def prep(tmp_path, corpus, name: str, *extra) -> subprocess.CompletedProcess:
    """A data_prep script on tmp_path/in -> tmp_path/out with the corpus tokenizer."""
    io = ("--input", tmp_path / "in", "--out", tmp_path / "out")
    return script(name, *io, "--tokenizer", corpus["root"] / "tok", *extra, check=False)


def one_line_error(result, *needles: str) -> None:
    """Exit 2, no traceback, and one `error:` line (Lightning's own info lines may precede it)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def skipped(result, reason: str, n: int) -> None:
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{reason} {n}" in result.stdout, result.stdout


def cli_fit(recipe, *extra: str, command: str = "fit"):
    """`tinyrecipe fit` in this process (these runs stop before training; a subprocess would
    spend seconds importing Lightning again): its exit code and what it wrote."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from types import SimpleNamespace

    from tinyrecipe.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        code = cli_main([command, "--config", str(recipe), *map(str, extra)])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# ---- one function per README row --------------------------------------------------------------


def malformed_json(tmp_path, corpus):
    skipped(prep_slim(tmp_path, corpus, [GOOD.encode(), b"{not json"]), "malformed_json", 1)


def missing_text(tmp_path, corpus):
    skipped(prep_slim(tmp_path, corpus, [GOOD.encode(), b'{"meta": {}}']), "missing_text", 1)


def empty_file(tmp_path, corpus):
    result = prep_slim(tmp_path, corpus, [b""], name="empty.jsonl.zst")
    one_line_error(result, "no usable documents", str(tmp_path / "in/train"), "check the input")
    assert not (tmp_path / "out/train").exists()


def non_utf8(tmp_path, corpus):
    skipped(prep_slim(tmp_path, corpus, [GOOD.encode(), b'{"text": "caf\xe9"}']), "non_utf8", 1)


def zstd_truncated(tmp_path, corpus):
    # ~400 KB: several zstd blocks, so the records of the complete blocks survive the cut
    lines = [json.dumps({"text": f"document {i} " * 10}).encode() for i in range(3000)]
    result = prep_slim(tmp_path, corpus, lines, cut=7)
    skipped(result, "truncated_file", 1)
    kept = int(re.search(r"train: ([\d,]+) documents", result.stdout)[1].replace(",", ""))
    assert 0 < kept < 3000


def parquet_without_content(tmp_path, corpus):
    (tmp_path / "in/python").mkdir(parents=True)
    code = [f"def f{i}(x):\n    return x + {i}\n" for i in range(400)]  # both splits get some
    pq.write_table(pa.table({"content": code}), tmp_path / "in/python/a.parquet")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in/python/b.parquet")
    result = prep(tmp_path, corpus, "prepare_starcoder.py", "--val-permille", 100)
    assert "missing_content_column 1" in result.stdout, result.stderr[-2000:]


def tokenizer_vocab_mismatch(tmp_path, corpus):
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    shape = json.dumps({**MICRO, "vocab_size": 2048})
    one_line_error(
        cli_fit(recipe, "--model.config", shape), "tokenizer vocab 1024", "prepare it again"
    )


def missing_data_dir(tmp_path, corpus):
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    text = recipe.read_text().replace(str(corpus["root"] / "slim/train"), str(tmp_path / "nope"))
    recipe.write_text(text)
    one_line_error(cli_fit(recipe), str(tmp_path / "nope"))


def empty_data_dir(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    text = recipe.read_text().replace(str(corpus["root"] / "slim/train"), str(tmp_path / "empty"))
    recipe.write_text(text)
    one_line_error(cli_fit(recipe), str(tmp_path / "empty"), "prepare")


def unknown_yaml_key(tmp_path, corpus):
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    recipe.write_text(recipe.read_text() + "\nmodle:\n  lr: 1.0\n")
    result = cli_fit(recipe)
    assert result.returncode == 2 and "modle" in result.stderr and "Traceback" not in result.stderr


def wrong_type(tmp_path, corpus):
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    result = cli_fit(recipe, "--trainer.max_steps", "many")
    assert result.returncode == 2 and "max_steps" in result.stderr
    assert "Traceback" not in result.stderr


def unknown_preset(tmp_path, corpus):
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1)
    one_line_error(
        cli_fit(recipe, "--model.preset", "gpt-5"), "unknown model preset 'gpt-5'", "tiny"
    )


def checkpoint_of_another_model(tmp_path, corpus):
    from tinyrecipe.train.module import CausalLMModule

    theirs = {"hyper_parameters": {"preset": "tiny", "config": {**MICRO, "n_layer": 3}}}
    with pytest.raises(ValueError, match=r"another model \(n_layer 3 vs 2.*resume with the recipe"):
        CausalLMModule(preset="tiny", config=MICRO).on_load_checkpoint(theirs)


def _nan_run(tmp_path, corpus, policy: str):
    """A real Trainer run whose 3rd training batch gives a NaN loss."""
    from tinyrecipe.data import DataSource, MixedStreamingDataModule
    from tinyrecipe.train.module import CausalLMModule

    module = CausalLMModule(
        preset="tiny", config=MICRO, guard={"nonfinite": policy}, schedule={"warmup_steps": 1}
    )
    module.configure_model()
    forward, calls = module.model.forward, {"n": 0}

    def poisoned(idx, targets=None, cache=None, documents=None):
        out = forward(idx, targets, cache, documents)
        if targets is not None and module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return out._replace(loss=out.loss * float("nan"))
        return out

    module.model.forward = poisoned
    data = MixedStreamingDataModule(
        [DataSource("slim", str(corpus["root"] / "slim/train"))], block_size=64, batch_size=2
    )
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(module, data)
    return trainer, module


def nan_loss_stop(tmp_path, corpus):
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 \(the update was skipped"):
        _nan_run(tmp_path, corpus, "stop")


def nan_loss_skip(tmp_path, corpus):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module = _nan_run(tmp_path, corpus, "skip")
    assert any("nan at step 2; that optimizer step was skipped" in str(w.message) for w in caught)
    assert trainer.global_step == 5 and module.guard.skipped == 1  # the NaN step updated nothing
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def disk_full_checkpoint(tmp_path, corpus):
    from tests.faults.test_checkpoint_faults import (
        test_disk_full_is_one_clear_error_and_the_old_checkpoint_stays as check,
    )

    with pytest.MonkeyPatch.context() as mp:
        check(tmp_path, mp)


def unreadable_last_checkpoint(tmp_path, corpus):
    from tests.faults.test_checkpoint_faults import (
        test_an_unreadable_last_falls_back_to_the_newest_readable_checkpoint as check,
    )

    check(tmp_path)


def checkpoint_cut_short(tmp_path, corpus):
    from tinyrecipe.checkpoint import save_tinyrecipe_checkpoint
    from tinyrecipe.model import Llama, ModelConfig

    config = ModelConfig(**MICRO)
    ckpt = tmp_path / "cut.ckpt"
    save_tinyrecipe_checkpoint(config, Llama(config).state_dict(), ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    tok = corpus["root"] / "tok"
    for args in (
        ("generate", "--ckpt", ckpt, "--tokenizer", tok),
        ("convert", "to-hf", ckpt, tmp_path / "hf"),
    ):
        one_line_error(tinyrecipe(*args), str(ckpt), "cut short or damaged")
    assert not (tmp_path / "hf").exists()


def _copied_split(tmp_path, corpus) -> Path:
    import shutil

    split = tmp_path / "slim-train"
    shutil.copytree(corpus["root"] / "slim/train", split)
    return split


def _fit_on(tmp_path, corpus, split):
    recipe = write_recipe(tmp_path, corpus, max_steps=1, every=1, workers=2)
    recipe.write_text(recipe.read_text().replace(str(corpus["root"] / "slim/train"), str(split)))
    return cli_fit(recipe)


def missing_chunk_file(tmp_path, corpus):
    split = _copied_split(tmp_path, corpus)
    chunk = sorted(split.glob("chunk-*.bin"))[-1]
    chunk.unlink()
    one_line_error(_fit_on(tmp_path, corpus, split), str(split), chunk.name, "prepare the split")


def unreadable_index(tmp_path, corpus):
    split = _copied_split(tmp_path, corpus)
    (split / "index.json").write_text('{"chunks": [')
    one_line_error(_fit_on(tmp_path, corpus, split), str(split / "index.json"), "unreadable")


def gpu_recipe_without_the_gpus(tmp_path, corpus):
    """The flagship recipe where its GPUs are missing: checked before anything is built."""
    recipe = ROOT / "recipes/tinyllama-1.1b.yaml"
    if not torch.cuda.is_available():
        for command in ("fit", "fabric"):
            result = cli_fit(recipe, command=command)
            one_line_error(result, "trainer.accelerator is 'gpu'", "recipes/quickstart.yaml")
    else:  # more GPUs than the machine has: Lightning's refusal, said in one line
        one_line_error(cli_fit(recipe, "--trainer.devices", "64"), "Lightning refuses", "only has")


def sft_bad_records(tmp_path, corpus):
    from tinyrecipe.data.sft import SFTDataModule

    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q"}\n{oops\n')
    dm = SFTDataModule(
        train_file=str(path), tokenizer_dir=str(corpus["root"] / "tok"), val_fraction=0
    )
    with pytest.warns(UserWarning, match=r"sft.jsonl: skipped 2 record\(s\)"):
        dm.setup("fit")
    assert dm.skipped == {"malformed JSON": 1, "missing or non-string response": 1}


CASES = {
    f.__name__.replace("_", "-"): f
    for f in (
        malformed_json,
        missing_text,
        empty_file,
        non_utf8,
        zstd_truncated,
        parquet_without_content,
        tokenizer_vocab_mismatch,
        missing_data_dir,
        empty_data_dir,
        unknown_yaml_key,
        wrong_type,
        unknown_preset,
        checkpoint_of_another_model,
        nan_loss_stop,
        nan_loss_skip,
        disk_full_checkpoint,
        unreadable_last_checkpoint,
        checkpoint_cut_short,
        missing_chunk_file,
        unreadable_index,
        gpu_recipe_without_the_gpus,
        sft_bad_records,
    )
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, corpus):
    CASES[case](tmp_path, corpus)


def test_docs_table_matches_these_tests():
    docs = (ROOT / "docs/reliability.md").read_text()
    table = docs[docs.index("## Bad input") :]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert rows == list(CASES), (
        "docs/reliability.md bad-input table and tests/faults/test_bad_inputs.py differ"
    )


def test_untrusted_files_are_never_unpickled_or_executed():
    """Weights load with weights_only / safetensors; no eval/exec/pickle of user data."""
    for path in sorted((ROOT / "src").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:  # to the matching parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start() : end]
            assert "weights_only=True" in call, (path.name, call)
        assert not re.search(r"(?<![.\w])(eval|exec)\(|import pickle|pickle\.load", text), path.name
    assert Path(ROOT / "src/tinyrecipe/checkpoint/resume.py").is_file()


def test_an_ablations_missing_data_says_how_to_make_it(tmp_path):
    """recipes/ablations/bos-only.yaml reads data the quickstart does not prepare."""
    if (ROOT / "data/quickstart/prepared-bos").exists():
        pytest.skip("this checkout has run `make ablation-data`")
    result = tinyrecipe(
        "fit",
        "--config",
        ROOT / "recipes/ablations/base.yaml",
        "--config",
        ROOT / "recipes/ablations/bos-only.yaml",
        "--trainer.default_root_dir",
        tmp_path / "run",
    )
    one_line_error(result, "prepared-bos", "make ablation-data")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "--config", "recipes/quickstart.yaml", "--model.warmup", "2", "--print_config"],
        ["fit", "--config", "recipes/quickstart.yaml", "--trainer.max_step", "2", "--print_config"],
        ["sweep", "--base", "recipes/ablations/base.yaml", "--seed", "1", "--dry-run"],
    ],
    ids=["fit-model", "fit-trainer", "sweep"],
)
def test_abbreviated_options_are_refused(argv, capsys, monkeypatch):
    """`--model.warmup 2` is not `--model.schedule.warmup_steps 2`: options are spelt out, on the command
    line as in a recipe file."""
    from tinyrecipe.cli import main as cli_main

    monkeypatch.chdir(ROOT)
    try:
        code = cli_main(argv)
    except SystemExit as exit:  # argparse's own usage error
        code = exit.code
    assert code == 2
    assert "unrecognized arguments: " + argv[-3] in capsys.readouterr().err


def test_a_recipe_that_is_not_yaml_names_its_file_and_line(tmp_path, capsys):
    from tinyrecipe.cli import main as cli_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 2\n bad: [\n")
    assert cli_main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"recipe '{bad}', line 3 column 2 is not valid YAML" in err[0]

"""The README's first command, `make quickstart`, end to end at a smaller size, then its data step again (which
must reuse what exists)."""

import os
import re
import subprocess
import sys

from .conftest import ROOT

SMALL = [
    "SAMPLE_ARGS=--max-mb 1",
    "VOCAB=1024",
    "VAL_PERMILLE=300",
    "FIT_ARGS=--trainer.max_steps 4 --trainer.val_check_interval 2 --data.val_max_blocks 4 "
    "--downstream_eval.limit 40 "
    '--model.config \'{"vocab_size": 1024, "n_layer": 2}\'',
]


def make_quickstart(workdir, target: str = "quickstart") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            target,
            f"VENV={sys.prefix}",
            "SKIP_SETUP=1",
            *SMALL,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_make_quickstart_small(tmp_path):
    for name in ("Makefile", "pyproject.toml", "recipes", "data_prep", ".ci"):
        (tmp_path / name).symlink_to(ROOT / name)
    first = make_quickstart(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    out = first.stdout
    assert " MB -> " in out and "trained a 1024-token BPE" in out
    assert "slimpajama train:" in out and "starcoderdata train:" in out
    assert "TensorBoard logs: out/quickstart/tensorboard" in out
    assert "checkpoint:       out/quickstart/checkpoints/last.ckpt" in out
    assert "\ndef" in out and "\nThe" in out  # the generated lines
    said = first.stdout + first.stderr  # the local task scored before and after training
    assert re.search(r"downstream eval at step 0 \(\d+ s\): stdlib_mc/acc", said)
    assert re.search(r"downstream eval at step 4 \(\d+ s\): stdlib_mc/acc", said)
    assert (tmp_path / "out/quickstart/checkpoints/last.ckpt").is_file()
    assert list((tmp_path / "out/quickstart/tensorboard").rglob("events.out.tfevents.*"))

    again = make_quickstart(tmp_path, "quickstart-data")  # the data step of a second quickstart
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already prepared, reused") == 4  # both splits of both sources
    # neither the sample corpus nor the tokenizer was rebuilt (their scripts print these)
    assert " MB -> " not in again.stdout and "trained a 1024-token BPE" not in again.stdout

    # the README's ablation line, as written there, on that data (this test's vocabulary, 2 steps)
    readme = (ROOT / "README.md").read_text()
    written = re.search(
        r"^tinyrecipe (fit --config recipes/ablations/base\.yaml .*?)  #", readme, re.M
    )
    line = written.group(1).split()
    small = ["--model.config.vocab_size", "1024", "--trainer.max_steps", "2"]
    small += ["--data.val_max_blocks", "2", "--data.batch_size", "2", "--data.num_workers", "0"]
    ablation = subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", *line, *small],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert ablation.returncode == 0, ablation.stderr[-3000:]
    assert (tmp_path / "out/ablations/mha/checkpoints/last.ckpt").exists()

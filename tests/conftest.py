"""Test-wide settings. Set before torch is imported anywhere in the run."""

import os

# torch's OpenMP threads spin-wait and crawl when another process shares the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# litdata asks the package index for its own version at import; tests run offline.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers (pytest-xdist): one core's threads each.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tinyrecipe(*args, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`tinyrecipe <args>` in a subprocess from the repo root, one torch thread, extra env vars."""
    return subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env),
        cwd=ROOT,
    )


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def script(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / name), *map(str, args)],
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The whole pipeline through the real scripts, on a ~0.5 MB-per-source sample."""
    root = tmp_path_factory.mktemp("corpus")
    out = script("make_sample.py", "--out", root / "raw", "--max-mb", 0.5).stdout
    assert "slimpajama:" in out and "starcoderdata:" in out
    script("train_tokenizer.py", root / "raw", "--vocab-size", 1024, "--out", root / "tok")
    slim = script(
        "prepare_slimpajama.py",
        "--input",
        root / "raw/slimpajama",
        "--tokenizer",
        root / "tok",
        "--out",
        root / "slim",
        "--workers",
        2,
        "--chunk-tokens",
        8192,
    ).stdout
    star = script(
        "prepare_starcoder.py",
        "--input",
        root / "raw/starcoderdata",
        "--tokenizer",
        root / "tok",
        "--out",
        root / "star",
        "--workers",
        2,
        "--chunk-tokens",
        8192,
        "--val-permille",
        100,
    ).stdout
    return {"root": root, "sample_out": out, "slim_out": slim, "star_out": star}


EVAL_LIMIT = 10  # questions per evaluation test: 40 log-likelihood requests


@pytest.fixture(scope="session")
def eval_task(corpus, tmp_path_factory):
    """The offline 4-way multiple-choice task `stdlib_mc` (lm-eval YAML + data) from the corpus."""
    import yaml

    from tinyrecipe.data.sample import make_eval_sample

    out = tmp_path_factory.mktemp("eval")
    make_eval_sample(corpus["root"] / "raw", out, n_items=40)
    # and `stdlib_gen`, the same items as greedy generation of a few tokens, scored by a
    # fingerprint of each (context, generated text) pair: any other text, or a text scored
    # against another item, moves the mean (a random model's exact match would be 0 anyway)
    mc = yaml.safe_load((out / "stdlib_mc.yaml").read_text())
    gen = {k: mc[k] for k in ("dataset_path", "dataset_kwargs", "test_split", "doc_to_text")}
    gen |= {
        "task": "stdlib_gen",
        "output_type": "generate_until",
        "doc_to_target": "{{choices[label]}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
        "metric_list": [{"metric": "fingerprint", "aggregation": "mean", "higher_is_better": True}],
    }
    (out / "stdlib_gen.yaml").write_text(
        yaml.safe_dump(gen) + "process_results: !function fingerprint.score\n"  # a YAML tag
    )
    (out / "fingerprint.py").write_text(
        "import zlib\n\n\ndef score(doc, results):\n"
        "    text = doc['context'] + '\\0' + results[0]\n"
        "    return {'fingerprint': zlib.crc32(text.encode()) % 1000 / 1000}\n"
    )
    return out


@pytest.fixture(scope="session")
def s3_corpus(corpus):
    """The corpus's prepared splits in a bucket `corpus` of an S3 server (moto's, on 127.0.0.1),
    reached through the standard AWS environment variables, which are set for the session."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    for split in ("slim/train", "slim/validation", "star/train"):
        for f in sorted((corpus["root"] / split).iterdir()):
            client.upload_file(str(f), "corpus", f"{split}/{f.name}")
    yield "s3://corpus"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()

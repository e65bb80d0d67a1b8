# The two commands: `make quickstart` (the main job) and `make test` (the suite).
# Both set up ./.venv themselves (idempotently; see .ci/setup-venv and README "Installing").
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export LITDATA_DISABLE_VERSION_CHECK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv venv-dev quickstart quickstart-data ablation-data smoke test test-fast rehearsal lint format bench gpu-check gpu-wheels clean

# SKIP_SETUP=1 uses $(VENV) as it is (the quickstart test runs inside an installed venv).
venv:
	[ -n "$(SKIP_SETUP)" ] || .ci/setup-venv

venv-dev:
	[ -n "$(SKIP_SETUP)" ] || .ci/setup-venv dev

# The one-command quickstart: sample corpus -> tokenizer -> prep -> fit -> a few generated lines.
# Each step reuses what exists (prep skips completed splits; delete data/quickstart to redo).
# (Q, QS_OUT, SAMPLE_ARGS, VOCAB, VAL_PERMILLE and FIT_ARGS exist so a test can run the same
# pipeline smaller; Q and QS_OUT must match the recipe's paths.)
Q := data/quickstart
QS_OUT := out/quickstart
SAMPLE_ARGS ?=
VOCAB ?= 4096
FIT_ARGS ?=
VAL_PERMILLE ?= 50

quickstart: venv quickstart-data
	$(VENV)/bin/tinyrecipe fit --config recipes/quickstart.yaml --ckpt_path auto $(FIT_ARGS)
	$(VENV)/bin/tinyrecipe generate --ckpt $(QS_OUT)/checkpoints/last.ckpt --tokenizer $(Q)/tokenizer \
	  --prompt "def" --prompt "The" --max-new-tokens 60
	@echo "TensorBoard logs: $(QS_OUT)/tensorboard   (tensorboard --logdir $(QS_OUT)/tensorboard)"
	@echo "checkpoint:       $(QS_OUT)/checkpoints/last.ckpt"

quickstart-data: venv
	[ -f $(Q)/raw/.complete ] || { $(PY) data_prep/make_sample.py --out $(Q)/raw $(SAMPLE_ARGS) && touch $(Q)/raw/.complete; }
	[ -f $(Q)/tokenizer/tokenizer.json ] || \
	  $(PY) data_prep/train_tokenizer.py $(Q)/raw --vocab-size $(VOCAB) --out $(Q)/tokenizer
	$(PY) data_prep/prepare_slimpajama.py --input $(Q)/raw/slimpajama --tokenizer $(Q)/tokenizer \
	  --out $(Q)/prepared/slimpajama
	$(PY) data_prep/prepare_starcoder.py --input $(Q)/raw/starcoderdata --tokenizer $(Q)/tokenizer \
	  --out $(Q)/prepared/starcoderdata --val-permille $(VAL_PERMILLE)
	[ -f $(Q)/eval/stdlib_mc.yaml ] || $(PY) data_prep/make_eval_sample.py --raw $(Q)/raw --out $(Q)/eval \
	  --val-permille $(VAL_PERMILLE)

# The data recipes/ablations/*.yaml read beyond the quickstart's: the corpus prepared with
# TinyLlama's BOS-only document boundaries (bos-only.yaml).
ablation-data: quickstart-data
	$(PY) data_prep/prepare_slimpajama.py --boundary bos --input $(Q)/raw/slimpajama \
	  --tokenizer $(Q)/tokenizer --out $(Q)/prepared-bos/slimpajama
	$(PY) data_prep/prepare_starcoder.py --boundary bos --val-permille $(VAL_PERMILLE) \
	  --input $(Q)/raw/starcoderdata --tokenizer $(Q)/tokenizer --out $(Q)/prepared-bos/starcoderdata

smoke: venv
	$(VENV)/bin/tinyrecipe smoke

# Two workers, each taking whole files (module fixtures run once): ~1.7x on 2 cores.
test: venv-dev
	$(PY) -m pytest -q -n 2 --dist loadfile

# The 8-rank rehearsal of the flagship recipe's structure on CPU (FSDP2, 4-rank elastic resume,
# HSDP 2 x 4; a few minutes on 2 cores; tests/test_rehearsal.py), left out of `make test`.
rehearsal: venv-dev
	$(PY) -m pytest -q -m rehearsal tests/test_rehearsal.py

# A representative subset in a few minutes (the `fast` marker; docs/install.md lists it).
test-fast: venv-dev
	$(PY) -m pytest -q -m fast

lint: venv-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The TinyLlama recipe's real path and the GPU-only checks on one GPU (~8 min on an H100/H200).
# A GPU machine with torch and Lightning but no network (a lent device machine): `make gpu-wheels`
# downloads here, for that machine's Python (GPU_PYVER), the wheels it lacks into .wheels/
# (git-ignored: carry it there); with .wheels/ present, `make gpu-check` installs them into
# GPU_PY with no index and runs the check on that Python's own torch. (Found by running the check
# in a venv holding only what the device image lists; litdata as in .ci/setup-venv.)
GPU_PY ?= python3
GPU_PYVER ?= 3.12
GPU_CHECK_ARGS ?=
GPU_WHEELS := litdata==0.2.76 'jsonargparse>=4.32' docstring-parser typeshed-client \
  importlib-resources zstandard 'torchao>=0.14,<0.18' boto3 botocore s3transfer jmespath

gpu-wheels: venv
	$(PY) -m pip download --quiet --dest .wheels --only-binary=:all: --no-deps \
	  --python-version $(GPU_PYVER) --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $(GPU_WHEELS)
	du -sh .wheels

gpu-check:
	if [ -d .wheels ]; then \
	  $(GPU_PY) -m pip install --quiet --no-index --no-deps .wheels/*.whl && \
	  PYTHONPATH=src $(GPU_PY) benchmarks/gpu_check.py --profile $(GPU_CHECK_ARGS); \
	else \
	  $(MAKE) venv && $(PY) benchmarks/gpu_check.py --profile $(GPU_CHECK_ARGS); \
	fi

bench: venv-dev
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

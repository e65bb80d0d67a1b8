# The two commands: `make quickstart` (the main job) and `make test` (the suite).
# Both set up ./.venv themselves (idempotently; see .ci/setup-venv and README "Installing").
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export LITDATA_DISABLE_VERSION_CHECK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv venv-dev quickstart test lint format bench clean

venv:
	.ci/setup-venv

venv-dev:
	.ci/setup-venv dev

quickstart: venv
	$(VENV)/bin/tinyrecipe smoke

test: venv-dev
	$(PY) -m pytest -q

lint: venv-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv-dev
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

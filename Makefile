# Two commands on a fresh machine: `make run` and `make test`. Both create the virtualenv
# and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build, found on this machine's disk; installing it first means the `torch` range in
# pyproject.toml is already satisfied and pip never fetches a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit lint format schemas bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

run: install
	exec $(BIN)/captionstream up

test: install
	$(BIN)/pytest -q

test-unit: install
	$(BIN)/pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schemas: install
	$(BIN)/python -m schemas.jsonschema

# A measurement, not a test: bare-model and whole-pipeline captioning speed on this machine
# (~10 min on 2 CPU cores), printed and written to bench/RESULTS.md. BENCH_ARGS="--quick"
# for a smoke run; `$(BIN)/python -m bench --help` for the knobs.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make run` and `make test`. Both create the virtualenv
# and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build, found on this machine's disk; installing it first means the `torch` range in
# pyproject.toml is already satisfied and pip never fetches a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install chromium run test test-unit soak lint format schemas bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian's Chromium for the demo page's browser test (tests/integration/test_demo_page.py),
# installed only when missing (as root; 44 s here). If it cannot be installed, that test
# is skipped with the reason; the rest of the suite does not need it.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium) || \
	  echo "chromium not installed: the demo page browser test will be skipped" >&2

run: install
	exec $(BIN)/captionstream up

test: install chromium
	$(BIN)/pytest -q

test-unit: install
	$(BIN)/pytest -q -m "not integration"

# Long fault and load runs (tests marked `soak`; `make test` leaves them out): repeated
# broker and gateway kills under a steady load. About 5 minutes on 2 cores.
soak: install
	$(BIN)/pytest -q -m soak -s

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
# (~3-4 min on 2 idle CPU cores), printed and written to bench/RESULTS.md. BENCH_ARGS="--quick"
# for a smoke run; `$(BIN)/python -m bench --help` for the knobs.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

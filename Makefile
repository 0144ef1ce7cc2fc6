# Two commands on a fresh machine: `make run` and `make test`. Both create the virtualenv
# and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned, and installed first so that the `torch` range in pyproject.toml is already
# satisfied. From PyPI this is the CUDA build (~2.8 GB of wheels with its nvidia-* and
# triton dependencies; it runs on the CPU too).
TORCH_SPEC ?= torch==2.13.0
# Every wheel is kept here: the package index answers with no-store, so pip's own cache
# keeps nothing, and each new venv (a fresh clone, `make clean`) would download it all
# again. The first install fills it (about 5 min here); later ones install from disk.
WHEELS ?= $(HOME)/.cache/captionstream/wheels
STAMP := $(VENV)/.installed
PIP_OFFLINE = $(BIN)/pip install -q --no-compile --no-index --find-links $(WHEELS)

.PHONY: install chromium run test test-unit soak lint format schemas docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# From the wheel cache alone when it has everything (about 1.5 min, plus 45 s to
	@# byte-compile below); otherwise fill it first (a first install downloads ~2.8 GB,
	@# about 5 min here), then install from it.
	$(PIP_OFFLINE) "$(TORCH_SPEC)" -e ".[dev]" 2>/dev/null || { \
	  echo "downloading wheels into $(WHEELS) (first install: ~2.8 GB)"; \
	  $(BIN)/pip download -q -d $(WHEELS) --find-links $(WHEELS) \
	    "$(TORCH_SPEC)" ".[dev]" "setuptools>=68" && \
	  $(PIP_OFFLINE) "$(TORCH_SPEC)" -e ".[dev]"; }
	@# Byte-compile it all once, on both cores (about 45 s): where PYTHONDONTWRITEBYTECODE
	@# is set, as on these machines, no .pyc is ever written otherwise, and every process
	@# start (a test run starts ~150) compiles torch and transformers again: 17-19 s of
	@# imports instead of 7-8 s. (Some packages ship files that do not compile, e.g.
	@# templates; that is expected, hence the `|| true`.)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
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

# Two test processes (pytest-xdist): the integration tests mostly wait on the processes
# and brokers they start, and one process left about half of two cores idle. Tests that
# share a stack, a broker or module fixtures stay in one process (tests/integration/
# conftest.py). TEST_PROCESSES=0 runs everything in this process. The run ends with its
# 15 slowest tests, so where the suite's time goes shows in every CI log.
TEST_PROCESSES ?= 2
test: install chromium
	$(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadgroup --durations=15

test-unit: install
	$(BIN)/pytest -q -m "not integration"

# Long fault and load runs (tests marked `soak`; `make test` leaves them out): repeated
# broker and gateway kills under a steady load, a rolling restart of a 3-node Apache
# Kafka, 1750 jobs from 100 clients with memory watched, worker restarts on durable
# embedded storage. About 10 minutes on 2 cores.
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
	$(BIN)/python -m captionstream.schemas.jsonschema

# docs/configuration.md, generated from the settings classes (a unit test fails when the
# committed page is stale).
docs: install
	$(BIN)/python -m captionstream.config_reference --write

# A measurement, not a test: bare-model and whole-pipeline captioning speed on this machine,
# written to bench/RESULTS.md; then the stack under clients that poll, written to
# bench/RESULTS-polling.md. What it runs, how long it takes and the knobs (BENCH_ARGS):
# `$(BIN)/python -m bench --help`; docs/performance.md.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.polling $(if $(findstring --quick,$(BENCH_ARGS)),--quick)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# herder — `make demo` shows a running stack, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HERDER_TEST_POSTGRES ?= postgresql://postgres@127.0.0.1:5432/test
export HERDER_TEST_POSTGRES

.DEFAULT_GOAL := help
.PHONY: help install test test-unit lint demo bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install herder with its dev tools (quick when already done)

test: $(STAMP) ## Run the whole suite (unit, integration against a real NATS and SQLite/PostgreSQL, e2e)
	@# One worker per core: much of the suite waits on processes, servers and heartbeats.
	$(BIN)/python -m pytest -n auto

test-unit: $(STAMP) ## Run only the pure unit tests
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@rm -rf .mypy-path && mkdir -p .mypy-path/herder
	@for pkg in protocol services robot coordinator cli client packaging; do ln -s ../../$$pkg .mypy-path/herder/$$pkg; done
	$(BIN)/mypy -p herder.protocol -p herder.services -p herder.robot -p herder.coordinator -p herder.cli -p herder.client -p herder.packaging
	$(BIN)/mypy -p tests --exclude tests/bench
	@# The benchmarks run as scripts and import benchlib from their own folder.
	cd tests/bench && $(abspath $(BIN))/mypy --config-file ../../pyproject.toml --cache-dir ../../.mypy_cache benchlib.py bench_rpc.py bench_dispatch.py bench_queues.py bench_secrets.py bench_scheduler.py

demo: $(STAMP) ## An embedded stack in a temporary folder, a robot, four jobs (run, stopped, killed)
	HERDER=$(BIN)/herder deploy/demo.sh

bench: $(STAMP) ## Run the benchmarks and print their figures
	$(BIN)/python tests/bench/bench_rpc.py
	$(BIN)/python tests/bench/bench_dispatch.py
	$(BIN)/python tests/bench/bench_queues.py
	$(BIN)/python tests/bench/bench_secrets.py
	$(BIN)/python tests/bench/bench_scheduler.py

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy-path .mypy_cache .ruff_cache .pytest_cache .hypothesis

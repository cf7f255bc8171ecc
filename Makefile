# kipam developer tasks. `make help` lists them.
# `run` and `test` bootstrap .venv themselves, so both work on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test lint typecheck unit bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install kipam with its test and dev tools

run: $(STAMP) ## start kipam serve on the embedded default (loopback only)
	$(BIN)/kipam serve

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: $(STAMP) ## mypy only
	$(BIN)/mypy

unit: $(STAMP) ## engine tests with the coverage gate
	$(BIN)/pytest tests/engine --cov --cov-report=term

test: lint $(STAMP) ## lint, type checks and every test
	$(BIN)/pytest --cov --cov-report=term

bench: $(STAMP) ## engine benchmarks; results go to bench/RESULTS.md by hand
	$(BIN)/python bench/engine_bench.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis build *.egg-info

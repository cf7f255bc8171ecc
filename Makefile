# kipam developer tasks. `make help` lists them.
# `run` and `test` bootstrap .venv themselves, so both work on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test lint proto proto-lint typecheck unit bench clean

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

lint: $(STAMP) proto-lint ## ruff (lint + format check), mypy and buf
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: $(STAMP) ## regenerate service/grpc/gen from proto/kipam/v1 (commit the result)
	$(BIN)/python proto/generate.py

BUF := proto/node_modules/.bin/buf
$(BUF): proto/package.json proto/package-lock.json
	npm ci --prefix proto --no-fund --no-audit --ignore-scripts --silent
	touch $(BUF)

proto-lint: ## buf lint and buf format over proto/ (buf pinned in proto/package.json)
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory $(BUF) && cd proto && node_modules/.bin/buf lint \
		&& node_modules/.bin/buf format --diff --exit-code; \
	else echo "proto-lint: skipped, npm not found (CI has it)"; fi

typecheck: $(STAMP) ## mypy only
	$(BIN)/mypy

unit: $(STAMP) ## engine tests with the coverage gate
	$(BIN)/pytest tests/engine --cov --cov-report=term

test: lint $(STAMP) ## lint, type checks and every test
	$(BIN)/pytest --cov --cov-report=term

bench: $(STAMP) ## engine benchmarks; results go to bench/RESULTS.md by hand
	$(BIN)/python bench/engine_bench.py

.PHONY: image scan scan-tools smoke-image
image scan: VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image: ## build the container image kipam:<version> (needs a Docker engine)
	docker build --build-arg VERSION=$(VERSION) \
		--build-arg SOURCE_URL="$$(git remote get-url origin 2>/dev/null)" -t kipam:$(VERSION) .

smoke-image: $(STAMP) ## build the image with buildah and run it with podman (or chrooted); root
	bash tests/packaging/smoke_image.sh

# checkov gets its own virtualenv: it pins packaging<24, which pytest 9 cannot use. The chart is
# scanned as Helm renders it, with the defaults (plus the database URL and first token an install
# needs) and with each example, one checkov run per scenario: a run builds one graph of all its
# files, and one scenario's NetworkPolicy must not cover another's pods. Any failed check fails;
# the chart's deliberate ones are skipped with reasons in annotations (helm/kipam/README.md).
CHECKOV      := $(VENV)/checkov/bin/checkov
CHECKOV_ARGS := --compact --quiet --skip-download
# .installed marks a finished install: the packaging test uses checkov only then (CI installs
# it while the tests run).
scan-tools: ## install checkov in its own virtualenv (make scan does it when needed)
	@test -f $(VENV)/checkov/.installed || { echo "scan: installing checkov in $(VENV)/checkov" \
		&& $(PYTHON) -m venv $(VENV)/checkov && $(VENV)/checkov/bin/python -m pip install \
		--quiet --quiet --disable-pip-version-check checkov==3.3.30 \
		&& touch $(VENV)/checkov/.installed; }

scan: $(STAMP) scan-tools ## hadolint and checkov on the Dockerfile, checkov on the rendered chart
	$(BIN)/hadolint Dockerfile
	$(CHECKOV) --framework dockerfile -f Dockerfile $(CHECKOV_ARGS)
	@set -e; out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; \
	$(BIN)/helm template kipam helm/kipam -n ipam \
		--set secret.databaseUrl=postgresql://kipam@db.example:5432/kipam \
		--set secret.bootstrapToken="$$($(BIN)/kipam token generate)" >"$$out/defaults.yaml"; \
	for values in helm/kipam/examples/*.yaml; do \
		$(BIN)/helm template kipam helm/kipam -n ipam -f "$$values" >"$$out/$${values##*/}"; \
	done; \
	failed=; for manifest in "$$out"/*.yaml; do \
		name=$${manifest##*/}; echo "checkov: helm/kipam, $${name%.yaml}"; \
		$(CHECKOV) --framework kubernetes -f "$$manifest" $(CHECKOV_ARGS) || failed=1; \
	done; test -z "$$failed"

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) proto/node_modules .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis build *.egg-info

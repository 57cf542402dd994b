# The two commands a newcomer runs: `make up` (a local fleet) and `make test` (every test).
# Everything is installed from committed locks, never resolved anew: uv itself from
# scripts/uv-bootstrap.txt (pinned, with hashes), shoal's environment from uv.lock.
# `make lock` re-resolves to the newest versions (docs/development.md).
PYTHON ?= python3
VENV ?= .venv
TOOLS ?= .tools
BIN := $(VENV)/bin
UV := $(TOOLS)/bin/uv
STAMP := $(VENV)/.installed
# uv uses this machine's Python and never downloads one; .venv is the project environment.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: up test lint install lock bench clean

$(UV): scripts/uv-bootstrap.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --require-hashes --no-deps -r scripts/uv-bootstrap.txt
	touch $(UV)

$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --quiet --frozen --all-extras
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/shoal up

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: $(STAMP)
	bash scripts/test-deps.sh
	$(UV) lock --check --quiet || { echo "uv.lock is stale for pyproject.toml: run make lock" >&2; exit 1; }
	$(UV) sync --frozen --all-extras --check --quiet
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Re-resolve every dependency to its newest release and show what moved.
lock: $(UV)
	cp uv.lock $(TOOLS)/uv.lock.before
	$(UV) lock --upgrade
	$(PYTHON) scripts/lock-diff.py $(TOOLS)/uv.lock.before uv.lock

clean:
	rm -rf $(VENV) $(TOOLS) build dist .pytest_cache .mypy_cache .ruff_cache

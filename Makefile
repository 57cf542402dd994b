# The two commands a newcomer runs: `make up` (a local fleet) and `make test` (every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/shoal up

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: $(STAMP)
	bash scripts/test-deps.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache

# otpgate: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./otpgate-data
HOST   ?= 127.0.0.1
PORT   ?= 8080
WORKERS ?= 1

.PHONY: run test lint install install-test services bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The service alone, for `make run`.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# The service plus everything the tests, linters and benchmarks use.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## Install and run the service on the embedded default (SQLite, in-process limits, local inbox).
run: install
	$(BIN)/otpgate init --data-dir $(DATA)
	$(BIN)/otpgate serve --data-dir $(DATA) --host $(HOST) --port $(PORT) --workers $(WORKERS)

## Run the whole test suite (starts PostgreSQL and Redis if they are down), then lint.
test: install-test services
	$(BIN)/pytest -q
	$(MAKE) lint

lint: install-test
	$(BIN)/ruff check src tests bench bench/soak bench/delivery_isolation
	$(BIN)/mypy

services:
	@scripts/services-up

bench: install-test
	$(BIN)/python bench/run

soak: install-test
	$(BIN)/python bench/soak

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

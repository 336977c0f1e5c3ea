# otpgate: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./otpgate-data
HOST   ?= 127.0.0.1
PORT   ?= 8080
WORKERS ?= 1

.PHONY: run test lint install services bench clean

$(BIN)/otpgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/otpgate

## Install and run the service on the embedded default (SQLite, in-process limits, local inbox).
run: install
	$(BIN)/otpgate init --data-dir $(DATA)
	$(BIN)/otpgate serve --data-dir $(DATA) --host $(HOST) --port $(PORT) --workers $(WORKERS)

## Run the whole test suite (starts PostgreSQL and Redis if they are down), then lint.
test: install services
	$(BIN)/pytest -q
	$(MAKE) lint

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

services:
	@scripts/services-up

bench: install
	bench/run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

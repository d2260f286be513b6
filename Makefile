# Two commands do all the set-up: `make run` and `make check`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run PORT=4333` beside a NATS server that already has 4222.
PORT ?= 4222

.PHONY: run check lint types test bench chaos install packer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,modal]'
	touch $(STAMP)

install: $(STAMP)

## Start the service on an embedded NATS server with the stub adapter.
run: $(STAMP)
	$(BIN)/sandboxer dev --port $(PORT)

## Lint, types and the whole test suite: what CI runs.
check: lint types test

## The chaos suite at full size (about 2 minutes on 2 cores); `make check` runs it small.
chaos: $(STAMP)
	SANDBOXER_CHAOS=full $(BIN)/pytest -q -p no:cacheprovider tests/test_chaos.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) packer
	$(BIN)/pytest -q

## Packer for the template tests (Debian's package) unless it is on PATH; where it
## cannot be installed, those tests say so and are skipped.
packer:
	@command -v packer >/dev/null || { \
	  apt-get install -y -qq packer >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq packer; } >/dev/null 2>&1 || \
	  echo "make: cannot install packer (apt-get install packer failed); the template tests will be skipped" >&2; }

## Throughput, latency and memory figures (not part of check).
bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .sandboxer .mypy_cache .ruff_cache .pytest_cache

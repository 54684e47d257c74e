# den: `make run` starts den on its embedded defaults; `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
DEN := $(VENV)/bin/den
PYTEST_ARGS ?=

.PHONY: run test deps test-deps bench-deps lint bench clean

deps:
	@scripts/install-deps run

test-deps:
	@scripts/install-deps test
	@scripts/fetch-test-data

bench-deps:
	@scripts/install-deps bench

run: deps
	$(DEN) init --yes
	$(DEN) serve

test: test-deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	scripts/with-postgres $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: bench-deps
	for b in rpc snapshot lifecycle idle ssh web exec microvm node; do $(VENV)/bin/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache

# The two quick-start commands: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps: serving needs only the package; the tests add the `test` extras (mypy, schemathesis...).
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test install lint typecheck pytest openapi bench bench-quick bench-proxy bench-refresh reliability clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(SERVE_STAMP)

# The test install includes what serving needs, so it marks both as done; it adds the engines'
# client (clients/python), whose tests run with the rest.
$(TEST_STAMP): pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]' -e ./clients/python
	touch $(SERVE_STAMP) $(TEST_STAMP)

install: $(TEST_STAMP)

run: $(SERVE_STAMP)
	$(BIN)/token-broker migrate
	$(BIN)/token-broker serve

lint: install
	$(BIN)/ruff check service tests bench alembic clients/python
	$(BIN)/ruff format --check service tests bench alembic clients/python

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

openapi: install
	$(BIN)/python -m service.openapi > openapi.yaml

bench: install
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/python -m bench.run --quick

bench-refresh: install
	$(BIN)/python -m bench.refresh $(ARGS)

# Proxied GET against calling the fake Dataverse directly, in one run (needs wrk).
bench-proxy: install
	$(BIN)/python -m bench.proxy

# The fault, throttling, crash, database-restart, rotation and load scenarios at full length
# (MariaDB on 127.0.0.1:3306); `make test` runs the same scenarios in their short form.
reliability: install
	$(BIN)/python -m bench.reliability

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

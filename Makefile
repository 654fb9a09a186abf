# The two quick-start commands: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint typecheck pytest openapi bench bench-quick bench-proxy reliability clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/token-broker migrate
	$(BIN)/token-broker serve

lint: install
	$(BIN)/ruff check service tests bench alembic
	$(BIN)/ruff format --check service tests bench alembic

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

# Proxied GET against calling the fake Dataverse directly, in one run (needs wrk).
bench-proxy: install
	$(BIN)/python -m bench.proxy

# The fault, throttling, crash, database-restart, rotation and load scenarios at full length
# (MariaDB on 127.0.0.1:3306); `make test` runs the same scenarios in their short form.
reliability: install
	$(BIN)/python -m bench.reliability

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

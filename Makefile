# kied: two commands on a fresh machine with Python >= 3.11.
#   make run    sets up .venv, then runs `kied serve` on the embedded defaults
#   make test   sets up .venv with the test tools, then runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/kied serve

test: $(VENV)/.installed-dev
	scripts/ensure-postgres
	$(BIN)/ruff check kied tests bench
	$(BIN)/ruff format --check kied tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

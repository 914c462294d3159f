# plugind: `make run` starts the daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "plugind needs Python >= 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/plugind serve

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check plugind tests bench
	$(BIN)/ruff format --check plugind tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/tasks.py
	$(BIN)/python bench/dify.py
	$(BIN)/python bench/backwards.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

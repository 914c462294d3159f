# plugind: `make run` starts the daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench bench-scale bench-soak clean

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

# Benchmarks (README, "Benchmark"). QUICK=1 (or BENCH_QUICK=1) runs small sizes; BENCH_ARGS are
# passed to bench/tasks.py and bench/scale.py, e.g. BENCH_ARGS="--roles worker+projector".
BENCH_FLAGS = $(if $(filter-out 0,$(QUICK)),--quick) $(BENCH_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/tasks.py $(BENCH_FLAGS)
	$(BIN)/python bench/dify.py
	$(BIN)/python bench/backwards.py

# a million rows in tasks and event_log, then 6,000 and 100,000 tasks; a rebuild of 1,000,000
# events (several minutes)
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py --parts grown,rebuild $(BENCH_FLAGS)

# 10 minutes at 1,000 tasks/s: the daemons' memory at the start, every minute and at the end
bench-soak: $(STAMP)
	$(BIN)/python bench/scale.py --parts soak $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Two entry points: `make demo` and `make test`. Both build .venv from scratch when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DIFFUSERS_OFFLINE := 1

.PHONY: demo test test-all test-realsize typecheck lint format bench clean world

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build on disk; never let pip resolve a bare `torch`.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/baka demo --out demo-output

# one torch thread per pytest worker, one worker per core (pytest-xdist; a file's tests stay in one
# worker, so module fixtures load once): the tiny test models are overhead-bound, and two torch threads
# on a 2-core machine made the serial run 2.9x slower (16:43 vs 5:49, docs/benchmarks.md)
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

# the real-size (2 GB checkpoint) I/O and memory tests, deselected from `make test`
test-realsize: $(STAMP)
	$(BIN)/python -m pytest -q -m realsize

test-all: test test-realsize

typecheck: $(STAMP)
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/merge_bench.py
	$(BIN)/python bench/generate_bench.py

# Rebuild the shipped shapes-world models (src/baka/world/weights) from nothing: render, VAE, text
# encoder pretraining, baka train, baka erase (~190 min on 2 cores, build 9; docs/world.md).
# Threads: BAKA_WORLD_THREADS (default 2); see docs/world.md.
world: $(STAMP)
	rm -rf build/world
	$(BIN)/python -m baka.world.build --out build/world

clean:
	rm -rf $(VENV) demo-output

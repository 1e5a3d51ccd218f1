# Two commands on a fresh machine: `make run` (demo pipeline) and `make test` (whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED = 1

.PHONY: install run test test-fast lint bench clean gpu-check

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first, pinned: an open range would pull the CUDA wheel (several GB).
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: digits, local Ray, MLflow on SQLite under ./mlruns.
run: $(STAMP)
	$(BIN)/dcpnas run

# Two xdist workers (tests/conftest.py says what runs where). PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadgroup)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q $(XDIST) --durations=25

test-fast: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q $(XDIST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check dcpnas pipeline tests bench
	$(BIN)/ruff format --check dcpnas pipeline tests bench

bench: $(STAMP)
	$(BIN)/python bench/search_step.py

clean:
	rm -rf $(VENV) .cache mlruns ray_results runs report .pytest_cache

# On a machine with a CUDA GPU: one table (and gpu-check.json) in < 8 minutes; exits 2 at once without a GPU.
gpu-check: $(STAMP)
	RAY_AUTH_MODE=disabled DS_ACCELERATOR=cuda $(BIN)/python bench/gpu_check.py --out gpu-check.json

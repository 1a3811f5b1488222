# gpunet: `make train` runs the main job, `make test` runs the checks. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: train test lint bench gpu-check info clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/gpunet train

test: $(STAMP)
	$(BIN)/ruff check gpunet tests benchmarks
	$(BIN)/ruff format --check gpunet tests benchmarks
	$(BIN)/python -m pytest -q tests benchmarks --benchmark-disable

lint: $(STAMP)
	$(BIN)/ruff check gpunet tests benchmarks
	$(BIN)/ruff format --check gpunet tests benchmarks

# The comparison (table, results.json, bench.png under runs/bench-<timestamp>/); the peers
# need `$(BIN)/pip install -e '.[bench]'`. The pytest-benchmark suites: `pytest benchmarks
# --benchmark-only` under the same env. Both unset the variables that force a slow GEMM kernel.
bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/gpunet bench --suite all --peers

# On a machine with a CUDA device: the gpu-marked tests, the kernels against their goldens,
# the cuBLAS alpha/beta GEMM and `gpunet bench --device cuda`, each stage with a time limit
# (8 minutes in all); one report, runs/gpu-check-<timestamp>.md. Without a device it exits 1
# at once, saying why (a check that ran nothing must not pass).
gpu-check: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m gpunet.bench.gpu_check

info: $(STAMP)
	$(BIN)/gpunet info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

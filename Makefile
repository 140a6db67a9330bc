# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch, a test-time reference only; `TORCH=` skips it (its tests then skip).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-slow test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime dependencies only: what `make demo` needs.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q .
	touch $@

# Test extras (transformers and torch, a CPU build, are test-time references only) and TPU ones.
$(VENV)/.test: $(VENV)/.core
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q ".[test,tpu]"
	touch $@

demo: $(VENV)/.core
	$(BIN)/python train.py configs/tiny.yaml --samples 3

test: $(VENV)/.test
	@$(BIN)/python -c "import sys, jax, flax; print(f'Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}')"
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.test
	$(BIN)/python -m pytest -q

clean:
	rm -rf .venv .venv-newest runs

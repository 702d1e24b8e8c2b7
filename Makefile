# Set-up, demo, tests and benchmarks. `make setup` makes .venv and installs ckptd into it.
# TORCH pins a torch that installs here without a multi-gigabyte download; override it with
# e.g. `make setup TORCH=torch==2.5.1` (or TORCH=torch for the default CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck clean bench bench-quick bench-multirank reliability

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check ckptd client tests examples bench
	$(BIN)/ruff format --check ckptd client tests examples bench

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m bench.run

bench-quick: setup
	$(BIN)/python -m bench.run --quick

# ckptd vs dcp.async_save vs dcp.save under torchrun (2 and 4 ranks, DDP and FSDP2).
bench-multirank: setup
	$(BIN)/python -m bench.multirank

# Runs the crash, power-loss, corruption, hostile-input and load tests and rewrites docs/RELIABILITY.md.
reliability: setup
	$(BIN)/python tests/reliability.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

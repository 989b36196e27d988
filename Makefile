# frameloom developer targets. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch wheel to install first. On this CPU-only build machine torch==2.13.0 resolves to the local CPU
# wheel; GPU users can run `make TORCH_SPEC=torch ...` to take the default (CUDA) build from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv quickstart test test-fast lint format bench clean

$(BIN)/frameloom: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/frameloom

venv: $(BIN)/frameloom

quickstart: venv
	$(BIN)/frameloom quickstart --out runs/quickstart

test: venv
	$(BIN)/python -m pytest -q --timeout=900

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: venv
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

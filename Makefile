# svdray: `make demo` runs the main job on the embedded tiny model; `make test` runs the tests.
# Both install what they need first (idempotent: a stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.svdray-installed
DEMO ?= demo

.PHONY: setup demo test lint format mlflow-ui clean

setup: $(STAMP)

# torch is installed first and pinned, so that nothing later lets pip pick a (CUDA) build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	@mkdir -p $(DEMO)
	@test -f $(DEMO)/tiny-svd/model_index.json || $(VENV)/bin/svdray tiny-model --out $(DEMO)/tiny-svd --seed 0
	$(VENV)/bin/svdray demo-data --out $(DEMO)/manifest.jsonl --validate-manifest $(DEMO)/val.jsonl
	RAY_AUTH_MODE=disabled $(VENV)/bin/svdray train --config configs/demo.yaml

test: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check svdray jobs tests benchmarks
	$(VENV)/bin/ruff format --check svdray jobs tests benchmarks

format: setup
	$(VENV)/bin/ruff format svdray jobs tests benchmarks
	$(VENV)/bin/ruff check --fix svdray jobs tests benchmarks

mlflow-ui: setup
	$(VENV)/bin/svdray ui --config configs/demo.yaml --port 5000

clean:
	rm -rf $(DEMO) outputs .pytest_cache .ruff_cache

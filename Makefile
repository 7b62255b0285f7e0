PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup debian-deps test test-fast demo demo-from-scratch reproduce reproduce-from-scratch clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

debian-deps:
	bash scripts/install_debian_deps.sh

test: setup debian-deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest tests

test-fast: setup debian-deps
	$(PY) -m pytest tests -m "not slow"

demo: setup
	bash scripts/install_debian_deps.sh --demo
	$(PY) -m drivers.demo --run-dir runs/demo

demo-from-scratch: setup
	bash scripts/install_debian_deps.sh --demo
	$(PY) -m drivers.demo --config configs/experiments/demo-from-scratch.yaml

reproduce: setup
	bash scripts/install_debian_deps.sh --demo
	$(PY) -m drivers.reproduce --run-dir runs/reproduce

reproduce-from-scratch: setup
	bash scripts/install_debian_deps.sh --demo
	$(PY) -m drivers.reproduce --config configs/experiments/reproduce-from-scratch.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache

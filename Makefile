# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, fetch the embedded model and corpus, run the default federated job
#   make test   create .venv, install, run the test suite
# TORCH selects the torch build; the default is the release this project is tested with.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# The tested versions of every other dependency (constraints.txt); CONSTRAINTS= resolves the newest in pyproject's ranges.
CONSTRAINTS ?= constraints.txt
DEVICES ?= 4
PY := $(VENV)/bin/python

.PHONY: install assets demo test test-cuda bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

assets: install
	$(PY) -m fedspallm.assets

demo: assets
	$(VENV)/bin/fabric run --devices $(DEVICES) fedspallm/main.py --config configs/default.yaml

test: assets
	$(PY) -m pytest -q

# On a machine with CUDA: the GPU tests (2 GPUs for the NCCL runs) and a timed GPU prune with its peak memory.
test-cuda: assets
	$(PY) -m pytest -q -m cuda tests/test_cuda.py -rs
	$(PY) bench/gpu_prune.py

bench: assets
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) lightning_logs

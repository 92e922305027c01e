# Two commands for a newcomer: `make reproduce` and `make test`. Both create the environment if missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/cifar10.yaml
DATA_ROOT ?=
STAMP := $(VENV)/.installed-stamp
REQUIREMENTS := requirements/constraints.txt requirements/base.txt requirements/cpu.txt pyproject.toml

.PHONY: reproduce test lint unit sync data bench venv clean-artifacts

# The environment: a venv with the exact CPU pins (torch and torchvision held by the constraints file).
$(STAMP): $(REQUIREMENTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/cpu.txt
	$(PY) -m pip install --quiet -c requirements/constraints.txt --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

## Run every notebook on a profile (default: the CPU-scale CIFAR-10 one); figures go to figures/<profile>/.
reproduce: $(STAMP)
	$(PY) -m helpers.reproduce --params $(PARAMS) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

## Lint, notebook pairs, unit tests and the papermill smoke run of every notebook.
test: lint unit

lint: $(STAMP)
	$(PY) -m ruff check helpers tests notebooks/*.py
	$(PY) -m ruff format --check helpers tests

unit: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -p no:cacheprovider tests

## Regenerate the .ipynb pairs from the percent-format sources (after editing a .py).
sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

## Download CIFAR-10 (needs a network) and write the JPEG ImageFolder layout to data/cifar10.
data: $(STAMP)
	$(PY) -m helpers.fetch_data --out data/cifar10

## Speed ratios measured in one run on this machine.
bench: $(STAMP)
	$(PY) -m helpers.bench $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

## Remove every cached stage result, listing each first (never silently).
clean-artifacts: $(STAMP)
	$(PY) -m helpers.cache --clean

# Two commands for a newcomer: `make reproduce` and `make test`. Both create the environment if missing.
SHELL := /bin/bash
SUPPORTED_PYTHONS := 3.11 3.12 3.13
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/cifar10.yaml
DATA_ROOT ?=
RETRAIN ?=
STAMP := $(VENV)/.installed-stamp
REQUIREMENTS := requirements/constraints.txt requirements/base.txt requirements/cpu.txt pyproject.toml

.PHONY: reproduce test lint unit sync data bench venv clean-artifacts report lab gpu-status gpu-prepare gpu-install

# The environment: a venv with the exact CPU pins (torch and torchvision held by the constraints file).
$(STAMP): $(REQUIREMENTS)
	@test -x $(PY) || "$(PYTHON)" -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(None if v in "$(SUPPORTED_PYTHONS)".split() else "$(PYTHON) is Python " + v + ": this project supports Python $(SUPPORTED_PYTHONS); run make with PYTHON=<one of them>")'
	@test -x $(PY) || "$(PYTHON)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/cpu.txt
	$(PY) -m pip install --quiet -c requirements/constraints.txt --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

DEFAULT_PARAMS := params/cifar10.yaml
## Run every notebook on a profile. The default profile publishes: figures/cifar10/ and the executed
## notebooks/*.ipynb. Any other PARAMS writes its figures under runs/<profile>/<time>/ only.
## It starts from the checkpoints shipped in figures/<profile>/checkpoints/ (verified; helpers/runners/checkpoints.py);
## RETRAIN=1 uses none and computes every stage again from nothing (about 4 hours on 2 CPU cores).
## ONLY="01 02": only the notebooks whose names start so (not with the default profile, which publishes them all).
reproduce: $(STAMP)
	$(PY) -m helpers.runners.reproduce --params "$(PARAMS)" $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") \
		$(if $(filter $(DEFAULT_PARAMS),$(PARAMS)),--publish) $(if $(RETRAIN),--retrain) $(if $(ONLY),--only $(ONLY))

## The HTML book from the executed notebooks: build/report/html/index.html (helpers/runners/report.py).
report: $(STAMP)
	$(PY) -m helpers.runners.report

## Step through the notebooks in JupyterLab with the project's environment (its Python is the kernel).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

## Lint, notebook pairs, unit tests and the papermill smoke run of every notebook.
test: lint unit

lint: $(STAMP)
	$(PY) -m ruff check helpers tests notebooks/*.py
	$(PY) -m ruff format --check helpers tests notebooks/*.py

unit: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -p no:cacheprovider tests

## Regenerate the .ipynb pairs from the percent-format sources (after editing a .py).
sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

## Download CIFAR-10 (needs a network) as JPEG files in the ImageFolder layout to data/cifar10: the same files as
## the shared copy (helpers/runners/fetch.py); `make reproduce` does this itself when it finds no CIFAR-10.
data: $(STAMP)
	$(PY) -m helpers.runners.fetch --out data/cifar10

## Speed ratios measured in one run on this machine.
bench: $(STAMP)
	$(PY) -m helpers.studies.bench $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)")

## Remove every cached stage result, listing each first (never silently).
clean-artifacts: $(STAMP)
	$(PY) -m helpers.cache --clean

## The GPU queue of params/cifar10-gpu.yaml (helpers/runners/gpu.py): which jobs are done, the next one prepared in .gpu/
## for one command on a lent GPU (`python3 -m helpers.runners.gpu run --out "$OUT"`, carrying .gpu), and the files it
## brought back checked and shipped into figures/cifar10-gpu/checkpoints/ (FROM=<the folder they came back to>).
gpu-status: $(STAMP)
	$(PY) -m helpers.runners.gpu status

gpu-prepare: $(STAMP)
	$(PY) -m helpers.runners.gpu prepare

gpu-install: $(STAMP)
	$(PY) -m helpers.runners.gpu install "$(FROM)"

# Quick start: `make repro` (set up + whole pipeline) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
DVC_VENV := .venv-dvc
STAMP := $(VENV)/.installed

# DVC lives in its own environment (its hydra pin of antlr 4.9 breaks Dagster's selection
# syntax, which needs 4.13); its `dvc` is linked into .venv/bin so one PATH has both.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# Nothing phones home or waits on the network.
export DVC_NO_ANALYTICS := 1
export DAGSTER_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export NO_ALBUMENTATIONS_UPDATE := 1
export GX_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE ?= 1
# pip on this kind of machine prints a warning per missing local index entry: keep the noise out.
PIP_QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: install repro repro-parallel test test-slow test-all lint ui materialize clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/dvc.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c requirements/lock.txt -e '.[dev]' $(PIP_QUIET)
	# rt-utils writes the tests' RTSTRUCTs. Its wheel requires the GUI opencv-python, which
	# would clash with the headless build albumentations brings (both are the module cv2):
	# installed without its requirements, which are here already (numpy, pydicom, cv2).
	$(VENV)/bin/pip install -q --no-deps -c requirements/lock.txt rt-utils $(PIP_QUIET)
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q -r requirements/dvc.txt $(PIP_QUIET)
	ln -sf $(CURDIR)/$(DVC_VENV)/bin/dvc $(VENV)/bin/dvc
	mkdir -p $(DAGSTER_HOME) && cp pipeline/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	touch $@

repro: install
	dvc repro

# Every model at once, each in a workspace of its own, at most WORKERS at a time (0: one per
# CPU core), then one `dvc repro` here that restores them from DVC's run-cache
# (docs/SCALING.md). It is the Dagster job train_all_parallel, run without the UI.
WORKERS ?= 0
repro-parallel: install
	test -f $(DAGSTER_HOME)/dagster.yaml || { mkdir -p $(DAGSTER_HOME) && cp pipeline/dagster.yaml $(DAGSTER_HOME)/; }
	python -m pipeline.parallel
	LIVERSEG_WORKERS=$(WORKERS) dagster job execute -m pipeline.definitions -j train_all_parallel

# `make test`: everything but the `slow` end-to-end tests (about 8 min on 2 idle cores);
# `make test-all` (CI): those too (about 35 min).
test: install
	pytest -q -m "not slow"

test-slow: install
	pytest -q -m slow

test-all: test test-slow

lint: install
	ruff check src pipeline tests

ui: install
	dagster dev -m pipeline.definitions -h 127.0.0.1 -p 3000

materialize: install
	dagster asset materialize -m pipeline.definitions --select '*'

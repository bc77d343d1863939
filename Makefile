# Two commands from a fresh clone (README.md, "Setup"):
#   make run    installs everything and runs the whole pipeline (dvc repro)
#   make test   installs what the tests need and runs the test suite
# Both reuse .venv on a re-run: pip runs again only when pyproject.toml changes.

VENV    ?= .venv
PYTHON  ?= python3.11
BIN     := $(CURDIR)/$(VENV)/bin

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR ?= $(CURDIR)/.dvc/tmp/site-cache
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run serve dashboard test test-slow lint install install-test clean install-cluster storage-check storage-remote mlflow-server

run: $(VENV)/.installed
	dvc repro
	dvc commit --force --quiet data.dvc   # version the raw data the run used (dvc push sends it)

serve: $(VENV)/.installed
	python -m pipeline.serve

dashboard: $(VENV)/.installed
	streamlit run dashboards/app.py --server.address 127.0.0.1 --server.port 8501 \
	    --server.headless true --browser.gatherUsageStats false

# A cluster whose nodes share no disk (README, "Running on a cluster"): $SEG_STORAGE_URI and
# $SEG_S3_ENDPOINT_URL name the shared storage.
storage-check: $(VENV)/.installed-cluster
	python -m pipeline.cluster check

storage-remote: $(VENV)/.installed-cluster
	python -m pipeline.cluster dvc-remote

mlflow-server: $(VENV)/.installed-cluster
	python -m pipeline.cluster mlflow-server

test: $(VENV)/.installed-test
	python -m pytest

test-slow: $(VENV)/.installed-test
	python -m pytest -m slow

lint: $(VENV)/.installed-test
	ruff check pipeline tests bench dashboards

install: $(VENV)/.installed
install-cluster: $(VENV)/.installed-cluster
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-cluster: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[cluster]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-cluster

clean:
	rm -rf data/download.json data/prepared .pytest_cache

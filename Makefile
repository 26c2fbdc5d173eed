# Two commands do it all on a fresh clone (Python 3.11+, git, make):
#   make repro   create .venv, install pinned dependencies, run the pipeline (dvc repro)
#   make test    the same install plus test tools, then the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test clean-venv

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, this is " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the dependency list or the pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -c 'from pipeline.dvcplots import ensure_page; ensure_page()'
	touch $@

install: $(STAMP)

repro: install
	dvc repro

test: install
	python -m pytest

clean-venv:
	rm -rf $(VENV)

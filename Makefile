# Every target creates or reuses the virtual environment, so each works on a fresh machine
# that has only Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint bench install clean peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deployhealth demo

# The interop tests talk to real nginx and coturn; installed from Debian when missing.
peers:
	@bash scripts/install-peers

test: $(STAMP) peers
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests functions benchmarks
	$(BIN)/cfn-lint template.yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info

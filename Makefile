# The two commands of the README. Each one makes .venv and installs what it needs on a fresh machine.
# torch is pinned to the CPU build that lies on this kind of machine's disk: a bare `torch` pulls a multi-GB
# CUDA build. The library itself only needs torch >= 2.4 (see pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,data]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/auxloss demo

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/tap_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# The two commands of the README. Each one makes .venv and installs what it needs on a fresh machine.
# torch is pinned to the CPU build that lies on this kind of machine's disk: a bare `torch` pulls a multi-GB
# CUDA build. The library itself only needs torch >= 2.4 (see pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-integration install install-integration lint bench clean

# The integration environment: the real torchvision, timm, transformers and lightning beside PyPI's default torch
# build (CUDA libraries included, used on CPU). The CPU build pinned above cannot import PyPI's torchvision
# (`operator torchvision::nms does not exist`), so these tests need their own venv. It takes about 6 GB of disk;
# pip keeps the downloaded wheels in its cache (~/.cache/pip, or $$PIP_CACHE_DIR), so a second install on the same
# machine downloads nothing.
INTEG_VENV := .venv-integration
INTEG_PY := $(INTEG_VENV)/bin/python
INTEG_PINS ?= torch==2.14.1 torchvision==0.29.1
INTEG_STAMP := $(INTEG_VENV)/.installed

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[experiment,data,dev]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

$(INTEG_STAMP): pyproject.toml Makefile
	test -x $(INTEG_PY) || $(PYTHON) -m venv $(INTEG_VENV)
	$(INTEG_PY) -m pip install --quiet --upgrade pip
	$(INTEG_PY) -m pip install --quiet $(INTEG_PINS)
	# The pins again, so that resolving the extras never swaps torch for another build.
	$(INTEG_PY) -m pip install --quiet -e ".[experiment,data,dev,integration]" $(INTEG_PINS)
	touch $(INTEG_STAMP)

install-integration: $(INTEG_STAMP)

demo: $(STAMP)
	$(VENV)/bin/auxloss demo

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -m "not slow and not integration" -q

# The tests marked `integration` against the real libraries (tests/integration_real/); none of them may skip there.
test-integration: $(INTEG_STAMP)
	AUXLOSS_INTEGRATION=1 $(INTEG_PY) -m pytest -m integration -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/tap_overhead.py

clean:
	rm -rf $(VENV) $(INTEG_VENV) .pytest_cache .hypothesis

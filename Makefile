# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   creates .venv, installs arq, runs the main job on the shipped MNIST models
#   make test   creates .venv, installs arq, runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch guesses the CUDA toolkit's location wrong without this; harmless when absent.
export CUDA_HOME ?= /usr/local/cuda
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

SOURCES := setup.py pyproject.toml requirements-ci.txt $(wildcard csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: install test test-fast demo bench clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-ci.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

demo: $(VENV)/.installed
	$(VENV)/bin/arq demo $(DEMO_ARGS)

bench: $(VENV)/.installed
	$(PY) -m pytest -q benchmarks/bench_*.py --benchmark-only --benchmark-json=benchmarks/results/cpu-latest.json

clean:
	rm -rf build $(VENV) arq/_C*.so *.egg-info

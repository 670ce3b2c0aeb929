# Stable entry points: `make demo`, `make test`, `make prepare`, `make pipeline` (outside checks use these names).
#   make demo                                   synthetic data -> whole pipeline -> runs/demo/metrics.json
#   make test                                   the test suite
#   make prepare  DATA=<MovieLens folder> RUN=<run folder>
#   make pipeline DATA=<MovieLens folder> RUN=<run folder> [POSTERS=<poster folder>] [PRESET=ml_small|ml25m|demo]
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= dataset/demo
RUN ?= runs/demo
POSTERS ?= $(DATA)/posters
PRESET ?= ml_small

.PHONY: venv test demo prepare pipeline bench clean-demo

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

prepare: venv
	$(PY) experiments/02_prepare_interactions.py --data $(DATA) --run $(RUN)

pipeline: prepare

demo: venv
	$(PY) experiments/00_make_demo_data.py --out dataset/demo
	$(MAKE) --no-print-directory pipeline DATA=dataset/demo RUN=runs/demo PRESET=demo

clean-demo:
	rm -rf dataset/demo runs/demo

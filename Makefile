# The README's two commands. Both create or reuse .venv themselves.
#   make demo   prepare the demo world (cached), then a lifelong stream with and without ODEdit
#   make test   ruff (lint + format check), then the whole test suite on CPU
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED ?= 1

.PHONY: demo test lint format venv bench clean

venv: $(STAMP)

# torch==2.13.0 is installed first and pinned by ci/constraints.txt, so pip never resolves a CUDA build.
$(STAMP): pyproject.toml ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -c ci/constraints.txt -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --config jobs/configs/demo.yaml

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	for b in odedit_overhead shards batching engine_overhead lifelong zero_memory; do $(PY) -m bench.$$b --quick || exit 1; done

clean:
	rm -rf outputs .pytest_cache

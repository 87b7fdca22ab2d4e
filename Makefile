# Two commands for a newcomer (see README): `make run` and `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast bench clean

$(BIN)/.core: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# Tests also compare against Hugging Face transformers on PyTorch CPU (the `reference` extra).
$(BIN)/.test: $(BIN)/.core
	$(BIN)/python -m pip install -q -e ".[test,reference]"
	touch $@

# The main job: tokenizer -> train a small LLaMA-style model on the embedded stdlib corpus ->
# validation perplexity vs the unigram baseline -> a sampled continuation.
run: $(BIN)/.core
	$(BIN)/lmx train --config=experiments/default.py
	$(BIN)/lmx generate --config=experiments/default.py

# Two worker processes (pytest-xdist), one test module per worker at a time (module-scoped
# fixtures such as a compiled model or a running server are built once); most of the suite
# is XLA compilation, which is single-threaded, so two workers use both cores of the CI VM.
# tests/conftest.py hands out the longest modules first, so neither worker idles at the end.
PYTEST_WORKERS ?= 2
test: $(BIN)/.test
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope

test-fast: $(BIN)/.test
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not slow"

bench: $(BIN)/.test
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .cache

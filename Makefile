# The two commands of the README, and the set-up they share.
#   make demo   set up, then pretrain a small DeBERTa on the bundled corpus and show what it learned
#   make test   set up, then check the package layers (import-linter) and run the test suite
# Set-up creates (or reuses) .venv and installs pinned dependencies. torch is pinned to the CPU
# build by default; on a GPU machine install your own torch into .venv first (it is kept), or
# run e.g. `make demo TORCH_SPEC=torch`.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The demo trains the best encoder recipe measured here (experiments/recipes.py): DeBERTa-v3 at
# 30% masking, 1,600 steps (deberta-tiny.yaml ships 1,000 to match bert-tiny.yaml's time).
demo: setup
	$(BIN)/lmforge pretrain --config configs/deberta-tiny.yaml train.max_steps=1600 train.max_time_s=900
	$(BIN)/lmforge predict "$$(ls -td runs/mlm.* | head -n 1)" --top-k 5 \
		"The president shall from time to time give to the [MASK] information of the state of the union." \
		"We must [MASK] our armed forces and our economy." \
		"The United [MASK] of America."

test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

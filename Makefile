# lfm: the usual targets. `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= The Eiffel Tower is located in the city of

.PHONY: install demo test test-fast lint format bench mutate clean

install: $(STAMP)

$(STAMP): pyproject.toml tools/install_extras.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[assets,dev]'
	$(BIN)/python tools/install_extras.py
	touch $(STAMP)

# The main job on the default model: what can be learnt from it, then two pipelines whose steps
# cross the areas (tuning -> merge -> editing; experts -> merges -> distillation), and MAML.
demo: install
	$(BIN)/lfm info smollm2-135m
	$(BIN)/lfm generate "$(PROMPT)" --model smollm2-135m --max-new-tokens 16
	$(BIN)/lfm plan smollm2-135m --task edit
	$(BIN)/lfm run examples/pipelines/tune-merge-edit.yaml
	$(BIN)/lfm run examples/pipelines/digits-experts.yaml
	@echo "== meta learning: MAML on sinusoid regression tasks (predicting 0 scores an MSE of about 4.3)"
	$(BIN)/lfm meta train --method maml --task sinusoid --steps 3000 --test-tasks 100
	$(BIN)/lfm runs list

# The linters, then every test, including those on the real offline models (marked `slow`).
test: install lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench tools examples
	$(BIN)/ruff format --check src tests bench tools examples
	$(BIN)/mypy
	$(BIN)/python tools/layers.py --quiet

format: install
	$(BIN)/ruff check --fix src tests bench tools examples
	$(BIN)/ruff format src tests bench tools examples

bench: install
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

# Mutation testing of one area's method code against its fast tests (not part of `make test`):
# `make mutate AREA=reuse`; the files and tests of each area are listed in tools/mutate.py.
mutate:
	@test -n "$(AREA)" || { echo "usage: make mutate AREA=<area> (the areas are listed in tools/mutate.py)"; exit 2; }
	@$(MAKE) --no-print-directory install
	$(BIN)/python tools/mutate.py $(AREA) $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants

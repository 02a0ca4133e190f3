# lfm: the usual targets. `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= The Eiffel Tower is located in the city of

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml tools/install_extras.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[assets,dev]'
	$(BIN)/python tools/install_extras.py
	touch $(STAMP)

# The main job on the default model, then one short step of each area (outputs under runs/).
demo: install
	$(BIN)/lfm info smollm2-135m
	$(BIN)/lfm generate "$(PROMPT)" --model smollm2-135m --max-new-tokens 16
	@echo "== tuning: LoRA on 4 BBC News articles per class, label words scored by the model"
	$(BIN)/lfm tuning train --method lora --model smollm2-135m --shots 4 --steps 8 --lr 1e-3 \
	    --eval-per-class 4 --max-chars 300 --threads 1
	@echo "== editing: ROME moves the Eiffel Tower to Rome, as a patch; the model file is untouched"
	$(BIN)/lfm edit apply smollm2-135m --prompt "$(PROMPT)" --subject "Eiffel Tower" --target Rome \
	    --config examples/configs/rome-demo.yaml -o runs/demo/eiffel-rome.safetensors
	$(BIN)/lfm edit eval smollm2-135m runs/demo/eiffel-rome.safetensors --prompt "$(PROMPT)" \
	    --prompt "The Eiffel Tower, a landmark in" --prompt "Berlin is the capital of"
	@echo "== reuse: TIES merge of three small models, streamed from safetensors shards"
	$(BIN)/python examples/reuse_merge.py
	@echo "== meta learning: MAML on sinusoid regression tasks"
	$(BIN)/lfm meta train --method maml --task sinusoid --steps 200 --test-tasks 100
	@echo "== distillation: a Fashion-MNIST teacher CNN into a smaller student with KD"
	$(BIN)/lfm distill vision --method kd --train-size 2000 --test-size 1000 --teacher-steps 60 \
	    --student-steps 60

# Every test, including those on the real offline models (marked `slow`).
test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench tools examples
	$(BIN)/ruff format --check src tests bench tools examples
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench tools examples
	$(BIN)/ruff format src tests bench tools examples

bench: install
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The two set-up commands of the README:
#   make train   - create .venv, install paratrain, run the main job (tiny GPT, 2 data-parallel ranks)
#   make test    - create .venv, install paratrain with test tools, run the whole test suite
#   make validate - the planner's predictions vs real runs on this machine (docs/planner.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test bench validate lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

train: setup
	$(BIN)/paratrain train

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/paratrain bench

validate: setup
	$(BIN)/python benchmarks/validate_planner.py

lint: setup
	$(BIN)/python -m ruff check paratrain tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# The two set-up commands of the README:
#   make train   - create .venv, install paratrain, run the main job (tiny GPT, 2 data-parallel ranks)
#   make test    - create .venv, install paratrain with test tools, run the whole test suite, then
#                  the equivalence tests (marker `equivalence`) again under a second CPU kernel set
#   make validate - the planner's predictions vs real runs on this machine (docs/planner.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The second kernel set of `make test`: AVX2 matmuls (MKL) and AVX2 ATen kernels. They round
# differently from the machine's default (AVX-512 on most current x86 servers), and every
# equivalence test must hold under both (tolerances: tests/common.py, benchmarks/noise_floor.py).
KERNELS2 := MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2

.PHONY: setup train test bench validate lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

train: setup
	$(BIN)/paratrain train

test: setup
	$(BIN)/python -m pytest -q --durations=25
	@echo "make test: the equivalence tests again, under $(KERNELS2)"
	env $(KERNELS2) $(BIN)/python -m pytest -q -m equivalence

bench: setup
	$(BIN)/paratrain bench

validate: setup
	$(BIN)/python benchmarks/validate_planner.py

lint: setup
	$(BIN)/python -m ruff check paratrain tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache

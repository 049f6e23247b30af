"""`make demo` from a clean clone, with no provider key and no Redis: the whole stack, for real."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import PROJECT_ROOT
from tests.local_processes import processes_under
from tests.services import port_open

DEMO_TIMEOUT_S = 1500


def unused_port() -> int:
    for port in range(47000, 48000):
        if not port_open("127.0.0.1", port):
            return port
    raise RuntimeError("no free port between 47000 and 48000")


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_make_demo_from_a_clean_clone_runs_the_batch_on_the_local_model_and_leaves_nothing(tmp_path: Path) -> None:
    # Given a clean clone, an empty package cache, no provider key, and nothing listening at REDIS_URL
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(clone)], check=True)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(
            ("OPENROUTER_", "ANTHROPIC_", "CLAUDE_", "PYTEST", "DATABASE_URL", "REDIS_URL", "UV_", "VIRTUAL_ENV")
        )
    }
    env["REDIS_URL"] = f"redis://127.0.0.1:{unused_port()}/0"
    # An empty package cache, so no cached wheel hides a missing install step
    env["PIP_CACHE_DIR"] = str(tmp_path / "empty-pip-cache")
    # When `make demo` runs
    result = subprocess.run(
        ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    # Then every demo job ended as scripted, on the local model and an embedded Valkey
    assert result.returncode == 0, output[-4000:]
    assert "every job ended as scripted" in output
    log = (clone / ".run" / "stack.log").read_text()
    assert "embedded Valkey" in output + log
    assert "smollm2-135m" in output + log
    assert "local model: answered its self-check completion" in output
    # And the local model reported token usage, shown in the table
    assert re.search(r"│ alice │ generate │ haiku +│ completed │ \d+ ", output), output[-4000:]
    # And nothing compiled: llama-cpp-python is not installed
    assert not list((clone / ".venv" / "lib").glob("python3*/site-packages/llama_cpp"))
    # And no process of the stack is left behind
    assert processes_under(clone) == []

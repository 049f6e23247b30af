"""The real local model (SmolLM2-135M behind xllamacpp's llama.cpp server) through a real worker.

``make demo`` covers ``openrouter`` on it (tests/integration/test_demo.py); these cover ``anthropic`` and
``claude-agent-sdk``, which reach the same server through its Anthropic Messages endpoint, as ``make run``
points them there when no key is configured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import actors
from actors import enqueue_generation
from actors.queue import JobQueue
from repositories.store import JobStatus
from settings import ProviderName, Settings
from stack.local_model import LOCAL_MODEL, READY_MARKER, free_port
from stack.run import local_model_env
from tests.conftest import unique
from tests.harness import PROJECT_ROOT, WorkerProcess, wait_for_job_status, wait_until
from tests.integration.conftest import WorkerSlot

pytestmark = pytest.mark.timeout(240)


class LocalModelServer:
    """``python -m stack.local_model`` on a free port, as ``make run`` starts it."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stack.local_model", "--port", str(self.port)],
            cwd=PROJECT_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def base_url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"

    def wait_until_ready(self) -> None:
        """Wait for the ready line; fail at once if the server died."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the local model server exited: {self.log_path.read_text()[-2000:]}")
            return READY_MARKER in self.log_path.read_text(errors="replace")

        wait_until(ready, timeout=60, interval=0.1, what="the local model server's ready line")

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self.process.terminate()
        self.process.wait(timeout=20)
        self._log.close()


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModelServer]:
    """One local model server for the module."""
    server = LocalModelServer(tmp_path_factory.mktemp("local-model") / "server.log")
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def no_other_worker(worker_slot: WorkerSlot) -> Iterator[None]:
    """Pause the session ``stack`` worker while this module runs: it consumes the same Redis queues."""
    with worker_slot.exclusive():
        yield


@pytest.mark.parametrize("provider", [ProviderName.ANTHROPIC, ProviderName.CLAUDE_AGENT_SDK])
def test_the_anthropic_providers_complete_a_generation_on_the_real_local_model_with_usage(
    provider: ProviderName,
    local_model: LocalModelServer,
    no_other_worker: None,
    tmp_path: Path,
) -> None:
    # Given a worker whose provider has no key, pointed at the local model as `make run` points it
    database_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = Settings(database_url=database_url, llm_provider=provider)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OPENROUTER_", "ANTHROPIC_", "CLAUDE_"))}
    env = {
        **inherited,
        "DATABASE_URL": database_url,
        "LLM_PROVIDER": str(provider),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
        **local_model_env(settings, local_model.base_url),
    }
    actors.broker.flush_all()
    queue = JobQueue(settings)
    previous = queue.bind()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        # When a generation is enqueued
        job_id = enqueue_generation(
            user_id=unique("local"),
            params={"model": LOCAL_MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24},
        )
        job = wait_for_job_status(queue.store, job_id, timeout=180)
    finally:
        worker.stop()
        actors.broker.flush_all()
        if previous is not None:
            previous.bind()
        queue.close()
    # Then the real model answered through the Anthropic Messages endpoint, with its token usage
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content
    # At most one retry, for a transient failure the queue retried. (llama.cpp's server closes its connection after
    # each streamed answer while announcing keep-alive; the Claude Code CLI's next request on it could be reset,
    # which `make run` leaves to the CLI's own retries: ``local_model_env``.)
    failed_attempts = [line for line in worker.log().splitlines() if "failed:" in line]
    assert job.attempts <= 2, failed_attempts
    assert job.response is not None
    assert job.response["provider"] == str(provider)
    usage = job.response["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0

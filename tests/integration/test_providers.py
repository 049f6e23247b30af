"""One behaviour suite for every provider, each in a real worker process against its loopback server.

``LLM_PROVIDER=openrouter`` talks to the loopback OpenRouter server; ``anthropic`` (the official SDK) and
``claude-agent-sdk`` (the real bundled Claude Code CLI) talk to the loopback Anthropic server. The store is
SQLite only: the two stores are covered by the ``stack`` suites, the providers here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

import actors
from actors import cancel_job, enqueue_generation, enqueue_preview, get_job
from actors.queue import JobQueue
from repositories.store import Job, JobStatus, JobStore
from settings import Settings
from tests.conftest import TEST_API_KEY, unique
from tests.harness import PROJECT_ROOT, WorkerProcess, wait_for_job_status, wait_until, wait_until_no_message_for
from tests.integration.conftest import WorkerSlot
from tests.local_processes import claude_processes
from tests.loopback import anthropic as anthropic_loopback
from tests.loopback import openrouter as openrouter_loopback
from tests.loopback.anthropic import AnthropicServer
from tests.loopback.openrouter import USAGE_COST, OpenRouterServer

pytestmark = pytest.mark.timeout(60)

PROVIDERS = ("openrouter", "anthropic", "claude-agent-sdk")
CLAUDE_MODEL = "claude-haiku-4-5"
ANTHROPIC_TEST_KEY = "sk-ant-test-" + "PROVIDERSUITEKEYNEVERLOGGED"
LONG_TEXT = "lorem ipsum dolor sit amet " * 20


@dataclass(frozen=True)
class ProviderCase:
    """What the suite expects of one provider where providers legitimately differ."""

    name: str
    model: str
    api_key: str
    finish_reason: str
    #: How a request carries the key, as ``(header, value)`` seen by the loopback server.
    key_header: tuple[str, str]
    #: Requests one refused (400) attempt makes: the Claude Code CLI repeats a 400 once with fewer beta headers.
    requests_per_refused_attempt: int

    @property
    def uses_anthropic_api(self) -> bool:
        """True when the provider talks to the Anthropic Messages API (the SDK or the CLI)."""
        return self.name != "openrouter"


CASES = {
    "openrouter": ProviderCase(
        name="openrouter",
        model="test/model",
        api_key=TEST_API_KEY,
        finish_reason="stop",
        key_header=("authorization", f"Bearer {TEST_API_KEY}"),
        requests_per_refused_attempt=1,
    ),
    "anthropic": ProviderCase(
        name="anthropic",
        model=CLAUDE_MODEL,
        api_key=ANTHROPIC_TEST_KEY,
        finish_reason="end_turn",
        key_header=("authorization", f"Bearer {ANTHROPIC_TEST_KEY}"),  # how anthropic 2.x sends ``api_key``
        requests_per_refused_attempt=1,
    ),
    "claude-agent-sdk": ProviderCase(
        name="claude-agent-sdk",
        model=CLAUDE_MODEL,
        api_key=ANTHROPIC_TEST_KEY,
        finish_reason="end_turn",
        key_header=("x-api-key", ANTHROPIC_TEST_KEY),
        requests_per_refused_attempt=2,
    ),
}


@dataclass(frozen=True)
class Scripted:
    """A provider-neutral scripted reply; the stack turns it into its loopback server's own ``Reply``."""

    chunks: tuple[str, ...] = ("Hello", ", ", "world")
    chunk_delay_s: float = 0.0
    stall_after_chunks: int | None = None
    status: int = 200
    retry_after: str | None = None
    message: str = "scripted error"


def ok(*chunks: str, chunk_delay_s: float = 0.0, stall_after_chunks: int | None = None) -> Scripted:
    """A success stream of ``chunks``, optionally slow or stalling after some chunks."""
    return Scripted(chunks=chunks, chunk_delay_s=chunk_delay_s, stall_after_chunks=stall_after_chunks)


def error(status: int, *, retry_after: str | None = None, message: str = "scripted error") -> Scripted:
    """An HTTP error answered before any stream, with the provider's JSON error body."""
    return Scripted(status=status, retry_after=retry_after, message=message)


class Recorded(Protocol):
    """What both loopback servers record of one request."""

    @property
    def index(self) -> int:
        """Arrival order on its server."""
        ...

    @property
    def path(self) -> str:
        """Request path, with the query string on the Anthropic server."""
        ...

    @property
    def headers(self) -> dict[str, str]:
        """Request headers, lower-cased names."""
        ...

    @property
    def received_at(self) -> float:
        """Arrival time (``time.time()``)."""
        ...

    @property
    def closed_at(self) -> float | None:
        """When the connection ended (``time.time()``), None while open."""
        ...

    @property
    def closed_by_client(self) -> bool:
        """True when the client hung up first."""
        ...


@dataclass
class ProviderStack:
    """A worker process configured for one provider, the loopback servers and the store it writes to."""

    case: ProviderCase
    store: JobStore
    worker: WorkerProcess
    env: dict[str, str]
    openrouter: OpenRouterServer
    anthropic: AnthropicServer
    log_dir: Path

    def params(self, key: str, **extra: Any) -> dict[str, Any]:
        """Generation params for this provider's model whose prompt routes to ``key``'s scripted replies."""
        content = f"Say hello [[{key}]]"
        return {"model": self.case.model, "messages": [{"role": "user", "content": content}], **extra}

    def script_for(self, key: str, *replies: Scripted) -> None:
        """Queue ``replies`` on the provider's loopback server for requests routed to ``key``."""
        for reply in replies:
            fields: dict[str, Any] = {
                "chunks": reply.chunks,
                "chunk_delay_s": reply.chunk_delay_s,
                "stall_after_chunks": reply.stall_after_chunks,
                "status": reply.status,
                "retry_after": reply.retry_after,
                "error_message": reply.message,
            }
            if self.case.uses_anthropic_api:
                self.anthropic.script_for(key, anthropic_loopback.Reply(**fields))
            else:
                self.openrouter.script_for(key, openrouter_loopback.Reply(**fields))

    def requests_for(self, key: str) -> Sequence[Recorded]:
        """The provider requests routed to ``key`` so far."""
        if self.case.uses_anthropic_api:
            return self.anthropic.requests_for(key)
        return self.openrouter.requests_for(key)

    def wait_for_close(self, request: Recorded, *, timeout: float) -> Recorded:
        """Wait until the connection of ``request`` ended; return its updated record."""
        if self.case.uses_anthropic_api:
            return self.anthropic.wait_for_close(request.index, timeout=timeout)
        return self.openrouter.wait_for_close(request.index, timeout=timeout)

    def wait_for_status(self, job_id: str, *statuses: JobStatus, timeout: float = 20.0) -> Job:
        """Wait until the job reaches one of ``statuses`` (any final status when none are given)."""
        job: Job = wait_for_job_status(self.store, job_id, *statuses, timeout=timeout)
        return job

    def wait_until_no_message_for(self, job_id: str, *, timeout: float = 20.0) -> None:
        """Wait until no message about ``job_id`` is queued, delayed or unacked in Redis (dead letters are done)."""
        wait_until_no_message_for(actors.broker.client, job_id, timeout=timeout)

    def new_worker(self, name: str, env: dict[str, str]) -> WorkerProcess:
        """Another worker process (not started) with ``env``, logging to its own file."""
        return WorkerProcess(env, self.log_dir / f"{name}.log")

    @contextlib.contextmanager
    def in_place_of_the_worker(self, other: WorkerProcess, *, flush: bool = True) -> Iterator[WorkerProcess]:
        """Run ``other`` instead of the suite's worker (one worker at a time), then bring the suite's back.

        With ``flush``, messages ``other`` left behind are dropped first.
        """
        self.worker.stop()
        try:
            yield other.start()
        finally:
            other.stop()
            if flush:
                actors.broker.flush_all()
            self.worker.start()


def worker_env(
    case: ProviderCase, database_url: str, openrouter: OpenRouterServer, anthropic: AnthropicServer
) -> dict[str, str]:
    """The environment of a worker for ``case``: only that provider's base URL and key are set."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENROUTER_", "ANTHROPIC_", "CLAUDE_"))
    }
    env = {
        **inherited,
        "DATABASE_URL": database_url,
        "LLM_PROVIDER": case.name,
        "PROGRESS_INTERVAL_MS": "200",
        "RETRY_MIN_BACKOFF_MS": "100",
        "RETRY_MAX_BACKOFF_MS": "400",
        "BROKER_HEARTBEAT_TIMEOUT_MS": "5000",
        "JOB_LEASE_S": "10",
        "SHUTDOWN_GRACE_S": "2",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    if case.uses_anthropic_api:
        env.update(ANTHROPIC_BASE_URL=anthropic.base_url, ANTHROPIC_API_KEY=case.api_key, PREVIEW_MODEL=CLAUDE_MODEL)
    else:
        env.update(OPENROUTER_BASE_URL=openrouter.base_url, OPENROUTER_API_KEY=case.api_key)
    return env


def claude_cli_processes(session_id: int) -> list[int]:
    """Pids of Claude Code CLI processes (zombies included) in the session a worker leads, orphans too."""
    return [pid for pid, _, session, _ in claude_processes() if session == session_id]


@pytest.fixture(scope="module")
def no_other_worker(worker_slot: WorkerSlot) -> Iterator[None]:
    """Pause the session ``stack`` worker while this module runs: it consumes the same Redis queues."""
    with worker_slot.exclusive():
        yield


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[AnthropicServer]:
    """The loopback Anthropic Messages API for the module."""
    with AnthropicServer() as server:
        yield server


@pytest.fixture(scope="module")
def providers_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module, shared by the three providers' workers."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("providers") / "jobs.db")


@pytest.fixture(scope="module", params=PROVIDERS)
def provider_stack(
    request: pytest.FixtureRequest,
    no_other_worker: None,
    openrouter: OpenRouterServer,
    anthropic_server: AnthropicServer,
    providers_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProviderStack]:
    """A worker process with ``LLM_PROVIDER`` set to each provider in turn; the test process shares its store."""
    case = CASES[request.param]
    actors.broker.flush_all()
    settings = Settings(database_url=providers_database)
    queue = JobQueue(settings)
    previous = queue.bind()
    store = queue.store
    env = worker_env(case, providers_database, openrouter, anthropic_server)
    log_dir = tmp_path_factory.mktemp(f"worker-{case.name}")
    worker = WorkerProcess(env, log_dir / "worker.log").start()
    yield ProviderStack(case, store, worker, env, openrouter, anthropic_server, log_dir)
    worker.stop()
    actors.broker.flush_all()
    if previous is not None:
        previous.bind()
    queue.close()


# -- the same behaviour from every provider ------------------------------------------------------------


def test_a_generation_completes_with_usage_and_the_reported_cost(provider_stack: ProviderStack) -> None:
    # Given a provider that streams three pieces and reports usage
    stack, case = provider_stack, provider_stack.case
    key = unique("done")
    stack.script_for(key, ok("Hello", ", ", "world"))
    # When web code enqueues a generation
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=stack.params(key), job_id=key))
    # Then it completes with the text, the provider's usage and, where the provider reports one, its cost
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "Hello, world"
    assert job.attempts == 1
    response = job.response
    assert response is not None
    assert (response["content"], response["provider"], response["model"]) == ("Hello, world", case.name, case.model)
    assert response["finish_reason"] == case.finish_reason
    usage = response["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if case.name == "openrouter":
        assert response["cost"] == USAGE_COST  # the usage chunk's ``cost``
    elif case.name == "claude-agent-sdk":
        assert response["cost"] > 0  # the CLI's ``total_cost_usd``, from its own price list
    else:
        assert "cost" not in response  # the Messages API reports no cost


def test_partial_content_grows_in_the_store_while_a_slow_stream_runs(provider_stack: ProviderStack) -> None:
    # Given a provider streaming one piece every 150 ms
    stack = provider_stack
    key = unique("slow")
    pieces = [f"w{i} " for i in range(16)]
    stack.script_for(key, ok(*pieces, chunk_delay_s=0.15))
    job_id = enqueue_generation(user_id="u1", params=stack.params(key), job_id=key)
    # When the web app polls the job
    seen: list[str] = []

    def growing_text_seen_three_times() -> bool:
        job = get_job(job_id, user_id="u1")
        if job is not None and job.status is JobStatus.PROCESSING and job.content and job.content not in seen:
            seen.append(job.content)
        return len(seen) >= 3

    wait_until(growing_text_seen_three_times, timeout=15, what="three growing partial texts")
    # Then it saw the text grow while processing, each a prefix of the final answer
    job = stack.wait_for_status(job_id)
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "".join(pieces)
    assert all(job.content.startswith(partial) for partial in seen)
    assert len(seen[0]) < len(seen[-1]) < len(job.content)


@pytest.mark.parametrize("status", [503, 529])
def test_an_unavailable_provider_is_retried_and_the_second_attempt_completes(
    provider_stack: ProviderStack, status: int
) -> None:
    # Given a provider that is overloaded once, then answers
    stack = provider_stack
    key = unique("busy")
    stack.script_for(key, error(status, message="overloaded"), ok("recovered"))
    # When a generation runs
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=stack.params(key), job_id=key))
    # Then the second attempt's answer is stored
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "recovered"
    assert job.attempts == 2
    assert len(stack.requests_for(key)) == 2


def test_a_bad_request_fails_the_job_at_once(provider_stack: ProviderStack) -> None:
    # Given a provider that refuses the request itself
    stack, case = provider_stack, provider_stack.case
    key = unique("bad")
    stack.script_for(key, error(400, message="bad field"), error(400, message="bad field"), ok("never"))
    # When a generation runs
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=stack.params(key), job_id=key))
    stack.wait_until_no_message_for(key)
    # Then it fails after one attempt with the status and the message, and is never retried
    assert job.status is JobStatus.FAILED
    assert job.attempts == 1
    assert job.error is not None
    assert job.error.startswith(f"{case.name} error 400: ")
    assert "bad field" in job.error
    assert len(stack.requests_for(key)) == case.requests_per_refused_attempt


def test_cancel_closes_the_provider_connection_within_a_second_and_keeps_the_partial_text(
    provider_stack: ProviderStack,
) -> None:
    # Given a job streaming slowly
    stack = provider_stack
    key = unique("cancel")
    pieces = [f"piece{i} " for i in range(100)]
    stack.script_for(key, ok(*pieces, chunk_delay_s=0.1), ok("a later attempt"))
    job_id = enqueue_generation(user_id="u1", params=stack.params(key), job_id=key)
    wait_until(lambda: (job := stack.store.get(job_id)) and job.content, timeout=15, what="partial text")
    # When it is cancelled
    assert cancel_job(job_id, user_id="u1") is True
    returned_at = time.time()
    # Then the worker closes the provider connection within a second of cancel_job returning
    closed = stack.wait_for_close(stack.requests_for(key)[0], timeout=5)
    assert closed.closed_by_client
    assert closed.closed_at is not None
    assert closed.closed_at - returned_at < 1.0
    # And the job stays cancelled with a proper prefix of the answer, and is never retried
    job = stack.wait_for_status(job_id)
    full = "".join(pieces)
    assert job.status is JobStatus.CANCELLED
    assert job.content
    assert full.startswith(job.content)
    assert len(job.content) < len(full)
    stack.wait_until_no_message_for(job_id)
    assert len(stack.requests_for(key)) == 1


def test_an_invalid_key_fails_the_job_at_once_and_the_key_is_never_shown(provider_stack: ProviderStack) -> None:
    # Given a provider that answers 401 to the configured key
    stack, case = provider_stack, provider_stack.case
    key = unique("auth")
    stack.script_for(key, error(401, message="invalid x-api-key"), ok("never"))
    # When a generation runs
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=stack.params(key), job_id=key))
    stack.wait_until_no_message_for(key)
    # Then it fails after one request with the status in its error
    assert job.status is JobStatus.FAILED
    assert job.attempts == 1
    assert job.error is not None
    assert job.error.startswith(f"{case.name} error 401: ")
    (request,) = stack.requests_for(key)
    header, value = case.key_header
    assert request.headers[header] == value
    # And the key is in neither the job nor the worker's log
    assert case.api_key not in job.error
    assert case.api_key not in repr(job)
    assert case.api_key not in stack.worker.log()


# -- Retry-After: honoured where the provider passes it on -----------------------------------------------


@pytest.mark.parametrize("provider_stack", ["openrouter", "anthropic"], indirect=True)
def test_retry_after_is_honoured_before_the_next_attempt(provider_stack: ProviderStack) -> None:
    # Given a 429 asking for two seconds, while the configured backoff is at most 0.4 s
    stack = provider_stack
    key = unique("later")
    stack.script_for(key, error(429, retry_after="2", message="rate limited"), ok("patient"))
    # When a generation runs
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=stack.params(key), job_id=key))
    # Then the second request came no earlier than two seconds after the first
    assert job.status is JobStatus.COMPLETED, job.error
    first, second = stack.requests_for(key)
    assert second.received_at - first.received_at >= 2.0


@pytest.mark.parametrize("provider_stack", ["claude-agent-sdk"], indirect=True)
def test_the_agent_sdk_retries_a_rate_limit_on_the_queue_backoff_as_its_cli_drops_retry_after(
    provider_stack: ProviderStack,
) -> None:
    # Given a 429 asking for 30 s: the CLI reports the status but not the header
    stack = provider_stack
    key = unique("later")
    stack.script_for(key, error(429, retry_after="30", message="rate limited"), ok("impatient"))
    # When a generation runs
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=stack.params(key), job_id=key))
    # Then it is still retried, after the configured backoff rather than the provider's 30 s
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.attempts == 2
    first, second = stack.requests_for(key)
    assert second.received_at - first.received_at < 30.0


# -- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider_stack", ["anthropic"], indirect=True)
def test_without_an_anthropic_key_the_worker_starts_and_a_job_fails_at_once_naming_it(
    provider_stack: ProviderStack,
) -> None:
    # Given a worker configured for Anthropic without ANTHROPIC_API_KEY
    stack = provider_stack
    env = {name: value for name, value in stack.env.items() if name != "ANTHROPIC_API_KEY"}
    key = unique("keyless")
    stack.script_for(key, ok("never"))
    with stack.in_place_of_the_worker(stack.new_worker("keyless", env)) as keyless:
        # Then it starts anyway, with one clear line naming the missing key
        lines = [line for line in keyless.log().splitlines() if "ANTHROPIC_API_KEY" in line]
        assert len(lines) == 1, lines
        assert "configuration problem: ANTHROPIC_API_KEY is required" in lines[0]
        # When a generation is enqueued
        job_id = enqueue_generation(user_id="u1", params=stack.params(key), job_id=key)
        job = stack.wait_for_status(job_id)
        stack.wait_until_no_message_for(job_id)
    # Then it fails at once, naming the key, without a provider request
    assert job.status is JobStatus.FAILED
    assert job.attempts == 1
    assert job.error is not None
    assert "ANTHROPIC_API_KEY" in job.error
    assert stack.requests_for(key) == []


# -- the Claude Agent SDK --------------------------------------------------------------------------------


@pytest.mark.parametrize("provider_stack", ["claude-agent-sdk"], indirect=True)
def test_with_the_agent_sdk_a_preview_calls_the_anthropic_api_directly(provider_stack: ProviderStack) -> None:
    # Given a worker on the agent SDK, a long document and a generation
    stack = provider_stack
    preview_key, generation_key = unique("preview"), unique("generation")
    stack.script_for(preview_key, ok("A short ", "preview."))
    stack.script_for(generation_key, ok("via the CLI"))
    # When both run
    preview_id = enqueue_preview(user_id="u1", title="Doc", content=f"[[{preview_key}]] {LONG_TEXT}")
    generation_id = enqueue_generation(user_id="u1", params=stack.params(generation_key))
    preview, generation = stack.wait_for_status(preview_id), stack.wait_for_status(generation_id)
    # Then the preview came from the preview model through the Anthropic SDK, in one plain Messages request
    assert preview.status is JobStatus.COMPLETED, preview.error
    assert preview.response is not None
    assert preview.response["preview"] == "A short preview."
    assert preview.response["used_ai"] is True
    assert (preview.response["provider"], preview.response["model"]) == ("anthropic", CLAUDE_MODEL)
    (direct,) = stack.requests_for(preview_key)
    assert direct.path == "/v1/messages"
    assert direct.headers["user-agent"].startswith("AsyncAnthropic/Python")
    # And the generation went through the Claude Code CLI, which looks different on the wire
    assert generation.status is JobStatus.COMPLETED, generation.error
    (via_cli,) = stack.requests_for(generation_key)
    assert via_cli.path == "/v1/messages?beta=true"
    assert via_cli.headers["user-agent"].startswith("claude-cli/")


@pytest.mark.parametrize("provider_stack", ["claude-agent-sdk"], indirect=True)
def test_cancelling_a_running_agent_sdk_job_leaves_no_cli_process(provider_stack: ProviderStack) -> None:
    # Given a job whose CLI streams a first piece, then stalls
    stack = provider_stack
    assert stack.worker.process is not None
    session = stack.worker.process.pid
    key = unique("cli-cancel")
    stack.script_for(key, ok("first ", "never", stall_after_chunks=1))
    job_id = enqueue_generation(user_id="u1", params=stack.params(key), job_id=key)
    wait_until(lambda: (job := stack.store.get(job_id)) and job.content, timeout=15, what="partial text")
    assert len(claude_cli_processes(session)) == 1
    # When it is cancelled
    assert cancel_job(job_id, user_id="u1") is True
    # Then the CLI is interrupted and reaped, and the job keeps its text
    wait_until(lambda: not claude_cli_processes(session), timeout=5, what="the CLI to be gone")
    job = stack.wait_for_status(job_id)
    assert job.status is JobStatus.CANCELLED
    assert job.content == "first "


@pytest.mark.parametrize("provider_stack", ["claude-agent-sdk"], indirect=True)
def test_a_worker_sigterm_during_a_running_agent_sdk_job_leaves_no_cli_process(provider_stack: ProviderStack) -> None:
    # Given a worker whose job's CLI streams a first piece, then stalls
    stack = provider_stack
    key = unique("cli-sigterm")
    stack.script_for(key, ok("first ", "never", stall_after_chunks=1))
    with stack.in_place_of_the_worker(stack.new_worker("sigterm", stack.env)) as doomed:
        assert doomed.process is not None
        session = doomed.process.pid
        job_id = enqueue_generation(user_id="u1", params=stack.params(key), job_id=key)
        wait_until(lambda: (job := stack.store.get(job_id)) and job.content, timeout=15, what="partial text")
        assert len(claude_cli_processes(session)) == 1
        # When the worker is stopped with SIGTERM (its process group, as the harness and systemd do)
        doomed.stop()
        # Then no CLI process is left, not even an orphan, and the provider connection is closed
        wait_until(lambda: not claude_cli_processes(session), timeout=5, what="the CLI to be gone")
        assert stack.wait_for_close(stack.requests_for(key)[0], timeout=5).closed_at is not None
        # (the interrupted job is handed back for a retry; cancel it so the suite's worker does not run it)
        cancel_job(job_id, user_id="u1")


@pytest.mark.parametrize("provider_stack", ["claude-agent-sdk"], indirect=True)
def test_a_sigterm_to_the_worker_leader_hands_a_long_agent_sdk_job_back_and_leaves_no_cli_process(
    provider_stack: ProviderStack,
) -> None:
    # Given a worker whose job's CLI streams a first piece, then stalls for longer than any shutdown allows
    stack = provider_stack
    key = unique("cli-leader")
    stack.script_for(key, ok("first ", "never", stall_after_chunks=1), ok("handed ", "back"))
    with stack.in_place_of_the_worker(stack.new_worker("leader-sigterm", stack.env), flush=False) as doomed:
        assert doomed.process is not None
        session = doomed.process.pid
        job_id = enqueue_generation(user_id="u1", params=stack.params(key), job_id=key)
        try:
            wait_until(lambda: (job := stack.store.get(job_id)) and job.content, timeout=15, what="partial text")
            # When only Dramatiq's main process gets SIGTERM (as `make run`, supervisord or `kill PID` send it)
            doomed.process.send_signal(signal.SIGTERM)
            doomed.process.wait(timeout=30)
            # Then no CLI process is left behind, and the job went back to the queue
            assert claude_cli_processes(session) == []
            handed_back = stack.store.get(job_id)
            assert handed_back is not None
            assert handed_back.status is JobStatus.PENDING
            assert "shut down" in (handed_back.error or "")
        finally:
            for pid in claude_cli_processes(session):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    # And the next worker completes it, without a retry used up
    job = stack.wait_for_status(job_id, timeout=30)
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "handed back"

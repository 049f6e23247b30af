"""The Claude Agent SDK provider running the real bundled Claude Code CLI against the loopback Messages API."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repositories.chat import ChatRequest, Finished, StreamEvent, TextDelta
from repositories.claude_agent import DEFAULT_MAX_TOKENS, ClaudeAgentProvider
from repositories.errors import AttemptTimedOut, ProviderError, RateLimited, Rejected, Unavailable
from tests.local_processes import claude_processes
from tests.loopback.anthropic import AnthropicServer, Reply
from tests.provider_streams import collect, failure_of

pytestmark = pytest.mark.timeout(60)

API_KEY = "sk-ant-test-" + "NEVERINANYMESSAGE"
MODEL = "claude-loopback-1"


def claude_children() -> list[tuple[int, str]]:
    """``(pid, state)`` of every child of this process that is a Claude Code CLI, zombies included."""
    return [(pid, state) for pid, parent, _, state in claude_processes() if parent == os.getpid()]


@pytest.fixture(scope="module")
def server() -> Iterator[AnthropicServer]:
    """One loopback Messages API for the module."""
    with AnthropicServer() as srv:
        yield srv


@pytest.fixture
def key() -> str:
    """A routing key unique to the test: its replies are scripted with ``script_for``."""
    return f"agent-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def provider(server: AnthropicServer) -> ClaudeAgentProvider:
    """A provider running the bundled CLI against the loopback server."""
    return ClaudeAgentProvider(api_key=API_KEY, base_url=server.base_url, wall_clock_limit_s=30)


def agent_workdirs() -> set[Path]:
    """The provider's temporary HOME directories that exist right now."""
    return set(Path(tempfile.gettempdir()).glob("claude-agent-*"))


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every test ends with no Claude Code CLI child process (running or zombie) and no new temporary HOME."""
    before = agent_workdirs()
    yield
    assert claude_children() == []
    assert agent_workdirs() <= before


def chat(key: str, *messages: tuple[str, str], **options: Any) -> ChatRequest:
    """A request whose last user message carries the ``[[key]]`` routing marker."""
    turns = list(messages) or [("user", "Say hello")]
    role, content = turns[-1]
    turns[-1] = (role, f"{content} [[{key}]]")
    return ChatRequest.model_validate(
        {"model": MODEL, "messages": [{"role": r, "content": c} for r, c in turns], **options}
    )


def test_a_completion_streams_through_the_cli_and_finishes_with_usage_and_cost(
    provider: ClaudeAgentProvider, server: AnthropicServer, key: str
) -> None:
    server.script_for(key, Reply.ok("Hel", "lo", "!", chunk_delay_s=0.05, input_tokens=40, output_tokens=3))

    events = collect(provider, chat(key, ("system", "Be terse [[system-marker]]"), ("user", "Say hello")))

    assert events[:-1] == [TextDelta("Hel"), TextDelta("lo"), TextDelta("!")]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert (finished.model, finished.finish_reason) == (MODEL, "end_turn")
    assert finished.usage is not None
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (40, 3)
    assert finished.cost is not None
    assert finished.cost > 0


def test_the_cli_sends_one_streaming_request_with_the_system_prompt_model_and_key(
    provider: ClaudeAgentProvider, server: AnthropicServer, key: str
) -> None:
    server.script_for(key, Reply.ok())

    collect(provider, chat(key, ("system", "Be terse [[system-marker]]"), ("user", "Say hello"), max_tokens=99))

    (recorded,) = server.wait_for_requests(1, key=key)
    assert recorded.path == "/v1/messages?beta=true"
    assert recorded.streaming
    assert recorded.body["model"] == MODEL
    assert recorded.body["max_tokens"] == 99
    assert recorded.body["tools"] == []
    assert "Be terse [[system-marker]]" in [block.get("text") for block in recorded.body["system"]]
    assert recorded.headers["x-api-key"] == API_KEY


def test_without_max_tokens_the_default_cap_is_sent(
    provider: ClaudeAgentProvider, server: AnthropicServer, key: str
) -> None:
    server.script_for(key, Reply.ok())

    collect(provider, chat(key))

    assert server.wait_for_requests(1, key=key)[0].body["max_tokens"] == DEFAULT_MAX_TOKENS


def test_a_conversation_is_rendered_into_one_prompt(
    provider: ClaudeAgentProvider, server: AnthropicServer, key: str
) -> None:
    server.script_for(key, Reply.ok())

    collect(provider, chat(key, ("user", "My name is Ada."), ("assistant", "Hello Ada."), ("user", "My name?")))

    text = server.wait_for_requests(1, key=key)[0].text
    assert '<message role="user">\nMy name is Ada.\n</message>' in text
    assert '<message role="assistant">\nHello Ada.\n</message>' in text
    assert text.index("My name is Ada.") < text.index("Hello Ada.") < text.index("My name?")


@pytest.mark.parametrize(
    ("reply", "kind", "status"),
    [
        (Reply.error(529), Unavailable, 529),
        (Reply.error(500), Unavailable, 500),
        (Reply.error(429, retry_after="5"), RateLimited, 429),
        (Reply.error(401), Rejected, 401),
        (Reply.stream_error("overloaded_error", "partial", after=1), Unavailable, 529),
    ],
    ids=["529", "500", "429", "401", "overloaded-mid-stream"],
)
def test_an_api_error_is_classified_by_the_status_the_cli_reports(
    provider: ClaudeAgentProvider,
    server: AnthropicServer,
    key: str,
    reply: Reply,
    kind: type[ProviderError],
    status: int,
) -> None:
    server.script_for(key, reply)

    events, error = failure_of(provider, chat(key))

    assert type(error) is kind
    assert error.status_code == status
    assert not any(isinstance(event, Finished) for event in events)
    assert API_KEY not in str(error)
    assert len(server.requests_for(key)) == 1


def test_a_400_is_rejected_after_the_cli_own_beta_fallback(
    provider: ClaudeAgentProvider, server: AnthropicServer, key: str
) -> None:
    # The CLI repeats a request refused with 400 once, with fewer beta headers.
    server.script_for(key, Reply.error(400, message="bad field"), Reply.error(400, message="bad field"))

    _, error = failure_of(provider, chat(key))

    assert isinstance(error, Rejected)
    assert error.status_code == 400
    assert "bad field" in str(error)


def test_cancelling_interrupts_the_cli_closes_the_connection_and_reaps_the_process(
    provider: ClaudeAgentProvider, server: AnthropicServer, key: str
) -> None:
    server.script_for(key, Reply.ok("first", "never", stall_after_chunks=1))

    async def run() -> tuple[float, float, list[StreamEvent]]:
        events: list[StreamEvent] = []
        first = asyncio.Event()

        async def pump() -> None:
            async for event in provider.stream(chat(key)):
                events.append(event)
                first.set()

        task = asyncio.create_task(pump())
        await asyncio.wait_for(first.wait(), timeout=20)
        assert len(claude_children()) == 1
        cancelled_at = time.time()
        task.cancel()
        request = server.wait_for_requests(1, key=key)[0]
        await asyncio.to_thread(server.wait_for_close, request, timeout=1.0)
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at, time.time() - cancelled_at, events

    cancelled_at, cleanup_s, events = asyncio.run(run())

    closed = server.wait_for_close(server.requests_for(key)[0], timeout=0)
    assert events == [TextDelta("first")]
    assert closed.closed_by_client
    assert closed.closed_at is not None
    assert closed.closed_at - cancelled_at < 1.0
    assert cleanup_s < 2.0
    assert claude_children() == []


def test_the_wall_clock_limit_stops_a_stalled_cli(server: AnthropicServer, key: str) -> None:
    provider = ClaudeAgentProvider(api_key=API_KEY, base_url=server.base_url, wall_clock_limit_s=2)
    server.script_for(key, Reply.ok("first", "never", stall_after_chunks=1))
    started = time.monotonic()

    events, error = failure_of(provider, chat(key))

    assert isinstance(error, AttemptTimedOut)
    assert not error.retryable
    assert events == [TextDelta("first")]
    assert time.monotonic() - started < 5
    assert server.wait_for_close(server.requests_for(key)[0], timeout=1.0).closed_by_client

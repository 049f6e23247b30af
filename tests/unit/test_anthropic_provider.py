"""The Anthropic provider against the loopback Messages API: streaming, request mapping, errors, cancellation."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import pytest

from repositories.anthropic import DEFAULT_MAX_TOKENS, AnthropicProvider
from repositories.chat import ChatRequest, Finished, StreamEvent, TextDelta, Usage
from repositories.errors import ProviderError, RateLimited, Rejected, StreamBroken, Unavailable
from tests.loopback.anthropic import AnthropicServer, Reply
from tests.provider_streams import collect, failure_of

pytestmark = pytest.mark.timeout(20)

API_KEY = "sk-ant-test-" + "NEVERINANYMESSAGE"
MODEL = "claude-loopback-1"


@pytest.fixture(scope="module")
def server() -> Iterator[AnthropicServer]:
    """One loopback Messages API for the module."""
    with AnthropicServer() as srv:
        yield srv


@pytest.fixture
def anthropic_server(server: AnthropicServer) -> AnthropicServer:
    """The module's server with no scripts and no recorded requests left over."""
    server.reset()
    return server


@pytest.fixture
def provider(anthropic_server: AnthropicServer) -> AnthropicProvider:
    """A provider pointed at the loopback server."""
    return AnthropicProvider(api_key=API_KEY, base_url=anthropic_server.base_url, read_timeout_s=5)


def chat(*messages: tuple[str, str], **options: Any) -> ChatRequest:
    """A request for ``MODEL`` with ``(role, content)`` messages."""
    return ChatRequest.model_validate(
        {"model": MODEL, "messages": [{"role": role, "content": content} for role, content in messages], **options}
    )


def test_a_completion_streams_its_text_then_finishes_with_model_reason_and_usage(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.script(Reply.ok("Hel", "lo", "!", input_tokens=12, output_tokens=3, stop_reason="end_turn"))

    events = collect(provider, chat(("user", "Say hello")))

    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta("!"),
        Finished(model=MODEL, finish_reason="end_turn", usage=Usage(12, 3), cost=None),
    ]


def test_system_messages_become_the_system_field_and_options_are_mapped(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    request = chat(
        ("system", "Be terse."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("system", "Answer in French."),
        ("user", "How are you?"),
        temperature=0.3,
        top_p=0.9,
        stop=["END"],
        max_tokens=77,
        frequency_penalty=0.5,
        presence_penalty=0.5,
    )

    collect(provider, request)

    body = anthropic_server.wait_for_requests(1)[0].body
    assert body["system"] == "Be terse.\n\nAnswer in French."
    assert body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How are you?"},
    ]
    assert (body["model"], body["max_tokens"], body["stream"]) == (MODEL, 77, True)
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.3, 0.9, ["END"])
    assert "frequency_penalty" not in body
    assert "presence_penalty" not in body


def test_a_request_without_max_tokens_gets_the_default_and_no_system_field(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    collect(provider, chat(("user", "Hi"), stop="STOP"))

    recorded = anthropic_server.wait_for_requests(1)[0]
    assert recorded.body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert recorded.body["stop_sequences"] == ["STOP"]
    assert "system" not in recorded.body
    assert recorded.path == "/v1/messages"
    assert API_KEY in (recorded.headers.get("x-api-key", "") + recorded.headers.get("authorization", ""))


def test_the_sdk_does_not_retry_on_its_own(provider: AnthropicProvider, anthropic_server: AnthropicServer) -> None:
    anthropic_server.script(Reply.error(529, retry_after="0"), Reply.ok())

    failure_of(provider, chat(("user", "Hi")))

    time.sleep(0.2)
    assert len(anthropic_server.requests) == 1


@pytest.mark.parametrize(
    ("status", "kind"),
    [(529, Unavailable), (500, Unavailable), (503, Unavailable), (400, Rejected), (401, Rejected), (403, Rejected)],
)
def test_an_error_status_is_classified_by_its_status(
    provider: AnthropicProvider, anthropic_server: AnthropicServer, status: int, kind: type[ProviderError]
) -> None:
    anthropic_server.script(Reply.error(status, message="upstream says no"))

    events, error = failure_of(provider, chat(("user", "Hi")))

    assert events == []
    assert type(error) is kind
    assert error.status_code == status
    assert error.retryable is (status >= 500)
    assert "upstream says no" in str(error)


def test_a_429_is_rate_limited_with_its_retry_after(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.script(Reply.error(429, retry_after="7", message="slow down"))

    _, error = failure_of(provider, chat(("user", "Hi")))

    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 7
    assert str(error) == "anthropic error 429: rate_limit_error: slow down"


@pytest.mark.parametrize(
    ("error_type", "kind"),
    [
        ("overloaded_error", Unavailable),
        ("api_error", StreamBroken),
        ("rate_limit_error", RateLimited),
        ("some_future_error", StreamBroken),
    ],
)
def test_a_retryable_error_event_mid_stream_is_retried(
    provider: AnthropicProvider, anthropic_server: AnthropicServer, error_type: str, kind: type[ProviderError]
) -> None:
    anthropic_server.script(Reply.stream_error(error_type, "partial", " text", after=1, error_message="Overloaded"))

    events, error = failure_of(provider, chat(("user", "Hi")))

    assert events == [TextDelta("partial")]
    assert type(error) is kind
    assert error.retryable
    assert "Overloaded" in str(error)


@pytest.mark.parametrize("error_type", ["invalid_request_error", "authentication_error", "permission_error"])
def test_an_error_event_refusing_the_request_is_not_retried(
    provider: AnthropicProvider, anthropic_server: AnthropicServer, error_type: str
) -> None:
    anthropic_server.script(Reply.stream_error(error_type, after=0))

    _, error = failure_of(provider, chat(("user", "Hi")))

    assert isinstance(error, Rejected)
    assert not error.retryable


def test_a_stream_cut_before_message_stop_is_broken(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.script(Reply.ok("a", "b", "c", drop_after_chunks=2))

    events, error = failure_of(provider, chat(("user", "Hi")))

    assert events == [TextDelta("a"), TextDelta("b")]
    assert isinstance(error, StreamBroken)


def test_a_reset_connection_mid_stream_is_broken(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.script(Reply.ok("a", "b", drop_after_chunks=1, drop_with_reset=True))

    _, error = failure_of(provider, chat(("user", "Hi")))

    assert isinstance(error, StreamBroken)


def test_a_silent_stream_times_out_as_a_retryable_error(anthropic_server: AnthropicServer) -> None:
    provider = AnthropicProvider(api_key=API_KEY, base_url=anthropic_server.base_url, read_timeout_s=0.3)
    anthropic_server.script(Reply.ok("a", "b", stall_after_chunks=1, pings=False))

    events, error = failure_of(provider, chat(("user", "Hi")))

    assert events == [TextDelta("a")]
    assert error.retryable


def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = AnthropicProvider(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}")

    _, error = failure_of(provider, chat(("user", "Hi")))

    assert isinstance(error, Unavailable)


def test_the_key_never_appears_in_an_error(provider: AnthropicProvider, anthropic_server: AnthropicServer) -> None:
    anthropic_server.script(Reply.error(401, message=f"invalid x-api-key {API_KEY}"))

    _, error = failure_of(provider, chat(("user", "Hi")))

    assert API_KEY not in str(error)
    assert API_KEY not in repr(error.args)


def test_cancelling_the_task_closes_the_connection_within_a_second(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.script(Reply.ok("first", "never", stall_after_chunks=1))

    async def run() -> tuple[float, list[StreamEvent]]:
        events: list[StreamEvent] = []
        first = asyncio.Event()

        async def pump() -> None:
            async for event in provider.stream(chat(("user", "Hi"))):
                events.append(event)
                first.set()

        task = asyncio.create_task(pump())
        await asyncio.wait_for(first.wait(), timeout=5)
        cancelled_at = time.time()
        task.cancel()
        request = anthropic_server.wait_for_requests(1)[0]
        # The loop keeps running while we wait, exactly as the worker does after ``task.cancel()``.
        await asyncio.to_thread(anthropic_server.wait_for_close, request, timeout=1.0)
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at, events

    cancelled_at, events = asyncio.run(run())

    closed = anthropic_server.wait_for_close(0, timeout=0)
    assert events == [TextDelta("first")]
    assert closed.closed_by_client
    assert closed.closed_at is not None
    assert closed.closed_at - cancelled_at < 1.0


def test_closing_the_stream_early_closes_the_connection(
    provider: AnthropicProvider, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.script(Reply.ok("first", "second", chunk_delay_s=30))

    async def run() -> None:
        stream = cast(AsyncGenerator[StreamEvent, None], provider.stream(chat(("user", "Hi"))))
        assert await anext(stream) == TextDelta("first")
        await stream.aclose()

    asyncio.run(run())

    closed = anthropic_server.wait_for_close(0, timeout=1.0)
    assert closed.closed_by_client

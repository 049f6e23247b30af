"""Self-tests of the loopback Anthropic Messages API server, driven by a raw `httpx` client over HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.loopback.anthropic import AnthropicServer, Reply

pytestmark = pytest.mark.timeout(10)

MODEL = "claude-loopback-1"


@pytest.fixture
def server() -> Iterator[AnthropicServer]:
    """A running loopback server, stopped after the test."""
    with AnthropicServer() as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A sync httpx client with short timeouts."""
    with httpx.Client(timeout=5.0) as http:
        yield http


def body(content: Any = "Say hello", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A Messages API request body."""
    return {
        "model": MODEL,
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def sse_events(client: httpx.Client, url: str, payload: dict[str, Any]) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    """POST ``payload`` and return the response and its ``(event name, decoded data)`` pairs."""
    events: list[tuple[str, Any]] = []
    name = ""
    with client.stream("POST", url, json=payload) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    return response, events


def test_a_stream_has_the_anthropic_event_sequence_with_usage(server: AnthropicServer, client: httpx.Client) -> None:
    server.script(Reply.ok("Hel", "lo", input_tokens=11, output_tokens=2))

    response, events = sse_events(client, f"{server.base_url}/v1/messages?beta=true", body())

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in events if name != "ping"]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    by_name = {name: data for name, data in events}
    assert by_name["message_start"]["message"]["usage"]["input_tokens"] == 11
    assert by_name["message_start"]["message"]["model"] == MODEL
    assert by_name["message_delta"]["delta"]["stop_reason"] == "end_turn"
    assert by_name["message_delta"]["usage"]["output_tokens"] == 2
    texts = [data["delta"]["text"] for name, data in events if name == "content_block_delta"]
    assert texts == ["Hel", "lo"]
    assert server.requests[0].path == "/v1/messages?beta=true"


def test_pings_come_only_when_scripted(server: AnthropicServer, client: httpx.Client) -> None:
    server.script(Reply.ok("a", "b"), Reply.ok("a", "b", pings=False))

    _, with_pings = sse_events(client, f"{server.base_url}/v1/messages", body())
    _, without = sse_events(client, f"{server.base_url}/v1/messages", body())

    assert [name for name, _ in with_pings].count("ping") >= 2
    assert "ping" not in [name for name, _ in without]


def test_an_error_status_has_the_anthropic_error_body_and_retry_after(
    server: AnthropicServer, client: httpx.Client
) -> None:
    server.script(Reply.error(429, retry_after=3, message="slow down"), Reply.error(529))

    limited = client.post(f"{server.base_url}/v1/messages", json=body())
    overloaded = client.post(f"{server.base_url}/v1/messages", json=body())

    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "3"
    assert limited.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert overloaded.status_code == 529
    assert overloaded.json()["error"]["type"] == "overloaded_error"


def test_an_error_mid_stream_is_an_error_event_then_the_end(server: AnthropicServer, client: httpx.Client) -> None:
    server.script(Reply.stream_error("overloaded_error", "a", "b", after=1, error_message="Overloaded"))

    response, events = sse_events(client, f"{server.base_url}/v1/messages", body())

    assert response.status_code == 200
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert [data["delta"]["text"] for name, data in events if name == "content_block_delta"] == ["a"]
    assert "message_stop" not in [name for name, _ in events]


def test_a_dropped_stream_ends_without_message_stop(server: AnthropicServer, client: httpx.Client) -> None:
    server.script(Reply.ok("a", "b", "c", drop_after_chunks=2))

    _, events = sse_events(client, f"{server.base_url}/v1/messages", body())

    assert [name for name, _ in events if name == "content_block_delta"] == ["content_block_delta"] * 2
    assert "message_stop" not in [name for name, _ in events]
    record = server.wait_for_close(0, timeout=1)
    assert (record.chunks_sent, record.closed_by_client) == (2, False)


def test_a_non_streaming_request_gets_one_json_message(server: AnthropicServer, client: httpx.Client) -> None:
    server.script(Reply.ok("Hel", "lo", input_tokens=5, stop_reason="max_tokens"))

    response = client.post(f"{server.base_url}/v1/messages", json=body(stream=False))

    message = response.json()
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"] == {"input_tokens": 5, "output_tokens": 2}


def test_a_non_streaming_request_turns_a_stream_error_into_its_status(
    server: AnthropicServer, client: httpx.Client
) -> None:
    server.script(Reply.stream_error("overloaded_error", after=1))

    response = client.post(f"{server.base_url}/v1/messages", json=body(stream=False))

    assert response.status_code == 529


def test_keyed_scripts_match_markers_in_system_prompts_and_content_blocks(
    server: AnthropicServer, client: httpx.Client
) -> None:
    server.script(Reply.ok("fifo"))
    server.script_for("in-system", Reply.ok("system"))
    server.script_for("in-block", Reply.ok("block"))
    url = f"{server.base_url}/v1/messages"

    blocks = [
        {"type": "text", "text": "<system-reminder>x</system-reminder>"},
        {"type": "text", "text": "[[in-block]]"},
    ]
    _, from_block = sse_events(client, url, body(blocks))
    _, from_system = sse_events(client, url, body("hi", system=[{"type": "text", "text": "You are [[in-system]]"}]))
    _, from_fifo = sse_events(client, url, body("no marker"))

    def text(events: list[tuple[str, Any]]) -> str:
        return "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")

    assert (text(from_block), text(from_system), text(from_fifo)) == ("block", "system", "fifo")
    assert [r.index for r in server.wait_for_requests(1, key="in-system")] == [1]


def test_other_routes_answer_404_in_the_anthropic_shape(server: AnthropicServer, client: httpx.Client) -> None:
    response = client.post(f"{server.base_url}/v1/complete", json=body())

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert server.requests == []


def test_a_stall_is_held_until_the_client_closes_and_the_close_is_recorded_promptly(
    server: AnthropicServer,
) -> None:
    server.script(Reply.ok("a", "b", stall_after_chunks=1))
    got_first = threading.Event()
    closed_at: list[float] = []

    def read_one_then_close() -> None:
        with httpx.Client(timeout=5.0) as http, http.stream("POST", f"{server.base_url}/v1/messages", json=body()) as r:
            for line in r.iter_lines():
                if "text_delta" in line:
                    got_first.set()
                    break
            closed_at.append(time.time())

    reader = threading.Thread(target=read_one_then_close)
    reader.start()
    assert got_first.wait(5)
    reader.join(5)

    record = server.wait_for_close(0, timeout=1.0)
    assert record.closed_by_client
    assert record.closed_at is not None
    assert record.closed_at - closed_at[0] < 0.5
    assert record.chunks_sent == 1

"""Self-tests of the loopback OpenRouter server, driven by a real `httpx` client over HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.loopback import OpenRouterServer, Reply

pytestmark = pytest.mark.timeout(10)

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def server() -> Iterator[OpenRouterServer]:
    """A running loopback server, stopped after the test."""
    with OpenRouterServer() as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A sync httpx client with short timeouts."""
    with httpx.Client(timeout=5.0, limits=httpx.Limits(max_connections=100)) as http:
        yield http


def chat_body(content: str = "Say hello", **extra: Any) -> dict[str, Any]:
    """A streaming chat-completions request body."""
    return {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": content}], **extra}


def stream_lines(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    """POST ``body`` and return the response and its non-empty SSE lines."""
    with client.stream("POST", url, json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    return response, lines


def data_payloads(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON payloads of the ``data:`` lines (without ``[DONE]``)."""
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]


def contents(payloads: list[dict[str, Any]]) -> list[str]:
    """The delta contents of the payloads that carry a choice."""
    return [p["choices"][0]["delta"]["content"] for p in payloads if p["choices"]]


def streamed_text(client: httpx.Client, server: OpenRouterServer, body: dict[str, Any]) -> str:
    """Stream one completion and return its concatenated text."""
    _, lines = stream_lines(client, f"{server.base_url}/chat/completions", body)
    return "".join(contents(data_payloads(lines)))


def test_a_default_reply_streams_a_comment_the_chunks_a_usage_chunk_and_done(
    server: OpenRouterServer, client: httpx.Client
) -> None:
    # Given a server without any script
    # When a client streams a chat completion
    response, lines = stream_lines(client, f"{server.base_url}/chat/completions", chat_body())

    # Then it gets an SSE stream without Content-Length that closes the connection
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["connection"] == "close"
    assert "content-length" not in response.headers
    # And the stream starts with the keep-alive comment and ends with [DONE]
    assert lines[0] == ": OPENROUTER PROCESSING"
    assert lines[-1] == "data: [DONE]"
    payloads = data_payloads(lines)
    assert contents(payloads) == ["Hello", ", ", "world", ""]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert {p["model"] for p in payloads} == {MODEL}
    assert len({p["id"] for p in payloads}) == 1
    assert payloads[0]["id"].startswith("gen-")
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]] == [None, None, None, "stop"]
    # And the last chunk carries the usage with no choices
    usage = payloads[-1]
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    assert usage["usage"]["cost"] == pytest.approx(0.00012)
    # And the server recorded a request that it finished itself
    record = server.wait_for_close(0)
    assert record.path == "/api/v1/chat/completions"
    assert record.body["model"] == MODEL
    assert record.headers["content-type"] == "application/json"
    assert record.chunks_sent == 3
    assert not record.closed_by_client
    assert record.closed_at is not None
    assert record.closed_at >= record.received_at


def test_an_error_reply_returns_its_status_a_json_error_body_and_retry_after(
    server: OpenRouterServer, client: httpx.Client
) -> None:
    # Given a scripted 429 with Retry-After
    server.script(Reply.error(429, retry_after="7", message="Rate limit exceeded"))

    # When a client asks for a completion
    response = client.post(f"{server.base_url}/chat/completions", json=chat_body())

    # Then it gets the status, the header and OpenRouter's error body
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert response.json() == {"error": {"code": 429, "message": "Rate limit exceeded", "metadata": {}}}
    assert server.wait_for_close(0).chunks_sent == 0


def test_a_mid_stream_error_arrives_as_an_error_chunk_and_ends_without_done(
    server: OpenRouterServer, client: httpx.Client
) -> None:
    # Given a reply that fails after two chunks
    server.script(
        Reply.ok("a", "b", "c", error_after_chunks=2, error_code="server_error", error_message="upstream died")
    )

    # When a client streams it
    response, lines = stream_lines(client, f"{server.base_url}/chat/completions", chat_body())

    # Then the status stays 200, two chunks arrive, then the error chunk, and no [DONE]
    assert response.status_code == 200
    payloads = data_payloads(lines)
    assert contents(payloads[:-1]) == ["a", "b"]
    error_chunk = payloads[-1]
    assert error_chunk["error"] == {"code": "server_error", "message": "upstream died"}
    assert error_chunk["choices"] == [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]
    assert "data: [DONE]" not in lines
    assert not any("usage" in p for p in payloads)
    assert server.wait_for_close(0).chunks_sent == 2


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_a_dropped_connection_ends_the_stream_without_done(
    server: OpenRouterServer, client: httpx.Client, reset: bool
) -> None:
    # Given a reply that drops the connection after one chunk
    server.script(Reply.ok("a", "b", "c", drop_after_chunks=1, drop_with_reset=reset))

    # When a client streams it
    lines: list[str] = []
    error: httpx.TransportError | None = None
    try:
        with client.stream("POST", f"{server.base_url}/chat/completions", json=chat_body()) as response:
            lines.extend(line for line in response.iter_lines() if line)
    except httpx.TransportError as exc:  # an RST surfaces as a read error
        error = exc

    # Then the stream ends without [DONE] (a FIN ends it quietly after the first chunk)
    assert "data: [DONE]" not in lines
    if not reset:
        assert error is None
        assert contents(data_payloads(lines)) == ["a"]
    # And the server records that it ended the connection itself
    record = server.wait_for_close(0)
    assert record.chunks_sent == 1
    assert not record.closed_by_client


def test_script_for_routes_by_user_and_by_marker_ahead_of_the_global_queue(
    server: OpenRouterServer, client: httpx.Client
) -> None:
    # Given a global reply and one keyed reply each for two jobs
    server.script(Reply.ok("global"))
    server.script_for("job-a", Reply.ok("for a"))
    server.script_for("job-b", Reply.ok("for b"))

    # When requests arrive for job-b (marker), job-a (user), no job, and job-a again
    texts = [
        streamed_text(client, server, chat_body("please [[job-b]]")),
        streamed_text(client, server, chat_body(user="job-a")),
        streamed_text(client, server, chat_body()),
        streamed_text(client, server, chat_body(user="job-a")),
    ]

    # Then keyed replies win, the FIFO serves the rest, and the default follows when both are empty
    assert texts == ["for b", "for a", "global", "Hello, world"]
    assert [r.index for r in server.wait_for_requests(2, key="job-a")] == [1, 3]
    (job_b,) = server.requests_for("job-b")
    assert job_b.index == 0
    assert job_b.key is None
    assert [r.key for r in server.requests] == [None, "job-a", None, "job-a"]


def test_a_stalled_stream_records_the_client_close_promptly(server: OpenRouterServer, client: httpx.Client) -> None:
    # Given a reply that stalls after two chunks
    server.script(Reply.ok("a", "b", "c", stall_after_chunks=2))

    # When a client reads the two chunks, waits a little and then closes the stream
    with client.stream("POST", f"{server.base_url}/chat/completions", json=chat_body()) as response:
        # (keep the line iterator alive: an abandoned httpx iterator closes the connection at once)
        lines = response.iter_lines()
        received: list[str] = []
        while len(received) < 2:
            line = next(lines)
            if line.startswith("data: "):
                received.append(line)
        # And while it waits, the server keeps the connection open
        with pytest.raises(TimeoutError, match="still open after 2 chunks"):
            server.wait_for_close(0, timeout=0.2)
        client_closed_at = time.time()

    # Then the server records a client close within 0.5 s
    record = server.wait_for_close(0, timeout=2.0)
    assert record.closed_by_client
    assert record.chunks_sent == 2
    assert record.closed_at is not None
    assert client_closed_at <= record.closed_at <= client_closed_at + 0.5


def test_sixty_four_streams_are_served_concurrently(server: OpenRouterServer, client: httpx.Client) -> None:
    # Given every reply holds its stream open (no chunk) until its client closes it
    server.default = Reply.ok("x", first_chunk_delay_s=60)
    streams = 64
    all_open = threading.Barrier(streams, timeout=8)

    def open_and_hold(index: int) -> int:
        with client.stream("POST", f"{server.base_url}/chat/completions", json=chat_body(f"n={index}")) as response:
            # The status line arrived: the server is serving this stream. Hold it until every client has one.
            all_open.wait()
            return response.status_code

    # When 64 clients open a stream each and wait for one another before closing theirs
    with ThreadPoolExecutor(max_workers=streams) as pool:
        statuses = list(pool.map(open_and_hold, range(streams)))

    # Then all 64 streams were being served at once (a server serving fewer at a time would leave the barrier
    # waiting, and it would break), and each was closed by its client, not by the server
    assert statuses == [200] * streams
    records = [server.wait_for_close(index, timeout=5) for index in range(streams)]
    assert all(record.closed_by_client for record in records)
    assert all(record.chunks_sent == 0 for record in records)


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions", "/api/v1/chat/completions"])
def test_chat_completions_is_served_under_any_prefix(server: OpenRouterServer, client: httpx.Client, path: str) -> None:
    # Given a running server
    origin = server.base_url.removesuffix("/api/v1")

    # When a client posts to the chat-completions path under some prefix
    _, lines = stream_lines(client, origin + path, chat_body())

    # Then it is served and recorded with that path
    assert lines[-1] == "data: [DONE]"
    assert server.wait_for_requests(1)[0].path == path


def test_unknown_paths_get_a_json_404_and_are_not_recorded(server: OpenRouterServer, client: httpx.Client) -> None:
    # Given a running server
    # When a client calls an unknown endpoint
    response = client.get(f"{server.base_url}/models")

    # Then it gets a JSON 404 and nothing is recorded
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404
    assert server.requests == []


def test_waiting_for_requests_that_never_come_raises_a_clear_timeout(server: OpenRouterServer) -> None:
    # Given a server that receives nothing
    # When a test waits for a request
    # Then it gets a TimeoutError saying what was expected
    with pytest.raises(TimeoutError, match=r"expected at least 1 requests for key 'job-x' within 0.05s, got 0"):
        server.wait_for_requests(1, timeout=0.05, key="job-x")

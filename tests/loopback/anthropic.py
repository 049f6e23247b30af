"""Scriptable loopback HTTP server that imitates the Anthropic Messages API (``POST /v1/messages``).

The twin of `tests.loopback.openrouter`: same design and names, and it reuses that module's socket
plumbing (client-close detection, stall, drop, server stop). The server runs in a background thread of
the test process; the ``anthropic`` SDK and the Claude Code CLI talk real HTTP to it. Every request to
``POST /v1/messages`` (any query string, e.g. ``?beta=true``) consumes one scripted `Reply` and is
recorded as a `RecordedRequest` (path with query, headers, body, arrival and close times, chunks sent).

Streaming answers are SSE with ``event:`` lines: ``message_start``, ``content_block_start``,
``content_block_delta`` (``text_delta``) per chunk, ``content_block_stop``, ``message_delta``,
``message_stop``, with ``ping`` events between them. ``"stream": false`` gets one JSON ``Message``.

Example::

    with AnthropicServer() as server:
        server.script(Reply.error(529), Reply.ok("Hi", " there"))
        server.script_for("job-42", Reply.ok("a", "b", stall_after_chunks=1))
        ...  # point the code under test at server.base_url
        request = server.wait_for_requests(1, key="job-42")[0]
        assert server.wait_for_close(request, timeout=1.0).closed_by_client

Manual use (serves the default reply until interrupted)::

    python -m tests.loopback.anthropic --port 8090
"""

from __future__ import annotations

import argparse
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar, Literal, cast

from tests.loopback.base import LoopbackServer, ScriptedReply
from tests.loopback.openrouter import (
    _ClientGoneError,
    _dumps,
    _Handler,
    _HTTPServer,
    _parse_json_object,
    _ServerStoppingError,
)

__all__ = [
    "DEFAULT_MODEL",
    "ERROR_TYPE_FOR_STATUS",
    "AnthropicServer",
    "RecordedRequest",
    "Reply",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-loopback"
"""Model reported in answers when neither the reply nor the request names one."""

ERROR_TYPE_FOR_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""The ``error.type`` Anthropic sends with each HTTP status (``api_error`` for any other status)."""

_STATUS_FOR_ERROR_TYPE = {error_type: status for status, error_type in ERROR_TYPE_FOR_STATUS.items()}

_Failure = Literal["error", "drop", "stall"]


# --------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply(ScriptedReply):
    """One scripted answer to one Messages request (see `ScriptedReply` for the shared fields).

    A stream always opens with ``message_start`` and ``content_block_start`` before any failure fires.
    """

    pings: bool = True
    input_tokens: int | None = None
    output_tokens: int | None = None
    stop_reason: str = "end_turn"
    error_type: str | None = None

    counts: ClassVar[tuple[str, ...]] = (*ScriptedReply.counts, "input_tokens", "output_tokens")

    @classmethod
    def stream_error(cls, error_type: str = "overloaded_error", *chunks: str, after: int = 0, **kw: Any) -> Reply:
        """A stream that sends ``after`` text chunks, then ``event: error`` of ``error_type``, then closes."""
        if chunks:
            kw["chunks"] = chunks
        return cls(error_type=error_type, error_after_chunks=after, **kw)

    @property
    def effective_error_type(self) -> str:
        """The ``error.type`` sent: ``error_type`` when set, else the one Anthropic uses for ``status``."""
        if self.error_type is not None:
            return self.error_type
        if self.is_error:
            return ERROR_TYPE_FOR_STATUS.get(self.status, "api_error")
        return "overloaded_error"


@dataclass
class RecordedRequest:
    """What the server saw of one Messages request, and how its connection ended."""

    index: int
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    closed_at: float | None = None
    closed_by_client: bool = False
    chunks_sent: int = 0
    reply: Reply | None = None

    @property
    def streaming(self) -> bool:
        """True when the request asked for an SSE stream (``"stream": true``)."""
        return self.body.get("stream") is True

    @property
    def text(self) -> str:
        """All text of the request: the system prompt and every message, joined by newlines."""
        return _request_text(self.body)

    def matches(self, key: str) -> bool:
        """True when this request is routed to ``key``: ``[[key]]`` appears in its system prompt or messages."""
        return f"[[{key}]]" in self.text


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


class AnthropicServer(LoopbackServer[Reply, RecordedRequest]):
    """Loopback imitation of the Anthropic Messages API serving scripted replies from a background thread.

    A request is routed to ``key`` when ``[[key]]`` appears anywhere in its system prompt or messages' text.
    The base URL is ``http://127.0.0.1:PORT``: the SDK and the CLI append ``/v1/messages``.
    """

    label = "Anthropic"

    def _initial_reply(self) -> Reply:
        return Reply()

    def _create_httpd(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        return _AnthropicHTTPServer(address, self)

    def _new_record(
        self, *, index: int, path: str, headers: dict[str, str], body: dict[str, Any], received_at: float
    ) -> RecordedRequest:
        return RecordedRequest(index=index, path=path, headers=headers, body=body, received_at=received_at)


# --------------------------------------------------------------------------------------------------
# HTTP plumbing (socket handling inherited from the OpenRouter loopback server)
# --------------------------------------------------------------------------------------------------


class _AnthropicHTTPServer(_HTTPServer):
    def __init__(self, address: tuple[str, int], owner: AnthropicServer) -> None:
        self.anthropic = owner
        self.owner = owner
        ThreadingHTTPServer.__init__(self, address, _AnthropicHandler)


class _AnthropicHandler(_Handler):
    server_version = "AnthropicLoopback/1.0"

    @property
    def _server(self) -> AnthropicServer:
        return cast(_AnthropicHTTPServer, self.server).anthropic

    # routes ---------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        self.close_connection = True
        route = self.path.split("?", 1)[0].rstrip("/")
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            logger.debug("could not read the request body of POST %s", self.path, exc_info=True)
            self._close(graceful=False)
            return
        if route != "/v1/messages":
            self._not_found(route)
            return
        record = self._server._record(self.path, self._header_dict(), _parse_json_object(raw))
        reply = record.reply or Reply()
        outcome: Literal["done", "dropped", "client", "stopping", "failed"]
        try:
            self._pause(reply.headers_delay_s)
            if reply.is_error:
                self._send_error_body(
                    reply.status,
                    reply.error_message,
                    reply.retry_after,
                    reply.effective_error_type,
                    plain_text=reply.plain_text_body,
                )
                outcome = "done"
            elif record.streaming:
                outcome = self._stream_message(record, reply)
            else:
                outcome = self._whole_message(record, reply)
        except _ClientGoneError:
            outcome = "client"
        except _ServerStoppingError:
            outcome = "stopping"
        except OSError as exc:
            outcome = "stopping" if self._server._stopping.is_set() else "client"
            logger.debug("write to request #%d failed: %r", record.index, exc)
        except Exception:
            logger.exception("loopback handler failed on request #%d", record.index)
            outcome = "failed"
        # Record the close before closing, so a client that has seen EOF also sees ``closed_at`` set.
        self._server._mark_closed(record, by_client=outcome == "client")
        if outcome != "dropped":
            self._close(graceful=outcome == "done")
        logger.debug("request #%d ended: %s after %d chunks", record.index, outcome, record.chunks_sent)

    # responses ------------------------------------------------------------------------------------

    def _send_error_body(
        self,
        status: int,
        message: str,
        retry_after: str | None,
        error_type: str | None = None,
        *,
        plain_text: bool = False,
    ) -> None:
        kind = error_type or ERROR_TYPE_FOR_STATUS.get(status, "api_error")
        if plain_text:
            payload, content_type = message.encode(), "text/plain; charset=utf-8"
        else:
            payload = _dumps({"type": "error", "error": {"type": kind, "message": message}})
            content_type = "application/json"
        self._check_stopping()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", _request_id())
        if retry_after is not None:
            self.send_header("retry-after", retry_after)
        self.send_header("Connection", "close")
        self.end_headers()
        self._write(payload)

    def _whole_message(self, record: RecordedRequest, reply: Reply) -> Literal["done", "dropped"]:
        """Answer ``"stream": false`` with one JSON Message; mid-stream failures become their non-stream forms."""
        event = _first_failure(reply)
        if event is not None:
            kind = event[1]
            if kind == "error":
                error_type = reply.effective_error_type
                status = _STATUS_FOR_ERROR_TYPE.get(error_type, 500)
                self._send_error_body(status, reply.error_message, reply.retry_after, error_type)
                return "done"
            self._pause(reply.first_chunk_delay_s)
            return self._fail_stream(kind, record, reply)
        self._pause(reply.first_chunk_delay_s + reply.chunk_delay_s * max(0, len(reply.chunks) - 1))
        message = {
            **self._message_base(record, reply),
            "content": [{"type": "text", "text": "".join(reply.chunks)}],
            "stop_reason": reply.stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": _input_tokens(record, reply), "output_tokens": _output_tokens(reply)},
        }
        payload = _dumps(message)
        self._check_stopping()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", _request_id())
        self.send_header("Connection", "close")
        self.end_headers()
        self._write(payload)
        for _ in reply.chunks:
            self._server._chunk_sent(record)
        return "done"

    def _stream_message(self, record: RecordedRequest, reply: Reply) -> Literal["done", "dropped"]:
        self._check_stopping()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("request-id", _request_id())
        self.send_header("Connection", "close")
        self.end_headers()

        start = {
            **self._message_base(record, reply),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": _input_tokens(record, reply), "output_tokens": 1},
        }
        self._write_event("message_start", {"type": "message_start", "message": start})
        self._write_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        if reply.pings:
            self._write_ping()
        self._pause(reply.first_chunk_delay_s)

        chunks = list(reply.chunks)
        event = _first_failure(reply)
        for i, piece in enumerate(chunks):
            if i > 0:
                self._between_deltas(reply)
            if event is not None and event[0] == i:
                return self._fail_stream(event[1], record, reply)
            delta = {"type": "text_delta", "text": piece}
            self._write_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            self._server._chunk_sent(record)
        if event is not None:
            if chunks:
                self._between_deltas(reply)
            return self._fail_stream(event[1], record, reply)

        self._write_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        self._write_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": _output_tokens(reply)},
            },
        )
        self._write_event("message_stop", {"type": "message_stop"})
        return "done"

    def _message_base(self, record: RecordedRequest, reply: Reply) -> dict[str, Any]:
        requested_model = record.body.get("model")
        model = reply.model or (requested_model if isinstance(requested_model, str) else DEFAULT_MODEL)
        return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model}

    def _fail_stream(self, kind: _Failure, record: RecordedRequest, reply: Reply) -> Literal["done", "dropped"]:
        if kind == "stall":
            logger.debug("request #%d stalls after %d chunks", record.index, record.chunks_sent)
            self._stall()
        if kind == "error":
            error = {"type": reply.effective_error_type, "message": reply.error_message}
            self._write_event("error", {"type": "error", "error": error})
            return "done"
        self._server._mark_closed(record, by_client=False)
        self._drop(reset=reply.drop_with_reset)
        return "dropped"

    def _between_deltas(self, reply: Reply) -> None:
        if reply.pings:
            self._write_ping()
        self._pause(reply.chunk_delay_s)

    def _write_event(self, name: str, data: dict[str, Any]) -> None:
        self._write(b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n")

    def _write_ping(self) -> None:
        self._write_event("ping", {"type": "ping"})


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _first_failure(reply: Reply) -> tuple[int, _Failure] | None:
    n = len(reply.chunks)
    triggers: list[tuple[int | None, _Failure]] = [
        (reply.error_after_chunks, "error"),
        (reply.drop_after_chunks, "drop"),
        (reply.stall_after_chunks, "stall"),
    ]
    candidates = [
        (min(after, n), priority, kind) for priority, (after, kind) in enumerate(triggers) if after is not None
    ]
    if not candidates:
        return None
    position, _, kind = min(candidates)
    return position, kind


def _content_text(content: Any) -> str:
    """Text of a ``content``/``system`` value: a string, or a list of blocks of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block["text"] for block in content if isinstance(block, dict) and isinstance(block.get("text"), str)
        )
    return ""


def _request_text(body: dict[str, Any]) -> str:
    parts = [_content_text(body.get("system"))]
    messages = body.get("messages")
    if isinstance(messages, list):
        parts.extend(_content_text(message.get("content")) for message in messages if isinstance(message, dict))
    return "\n".join(part for part in parts if part)


def _input_tokens(record: RecordedRequest, reply: Reply) -> int:
    if reply.input_tokens is not None:
        return reply.input_tokens
    return max(1, len(record.text) // 4)


def _output_tokens(reply: Reply) -> int:
    return reply.output_tokens if reply.output_tokens is not None else len(reply.chunks)


def _request_id() -> str:
    return f"req_loopback_{uuid.uuid4().hex[:20]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the default reply until interrupted (``python -m tests.loopback.anthropic --port 8090``)."""
    parser = argparse.ArgumentParser(description="Loopback Anthropic Messages API server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = AnthropicServer(host=args.host, port=args.port).start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

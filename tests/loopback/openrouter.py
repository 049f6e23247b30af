"""Scriptable loopback HTTP server that imitates OpenRouter's chat-completions wire protocol.

The server runs in a background thread of the test process; worker processes talk real HTTP to it.
Every request to ``POST .../chat/completions`` consumes one scripted `Reply` and is recorded as a
`RecordedRequest` (arrival time, close time, whether the client hung up, chunks sent).

Example::

    with OpenRouterServer() as server:
        server.script(Reply.error(429, retry_after="2"), Reply.ok("Hi", " there"))
        server.script_for("job-42", Reply.ok("a", "b", stall_after_chunks=1))
        ...  # point the code under test at server.base_url
        request = server.wait_for_requests(1, key="job-42")[0]
        assert server.wait_for_close(request, timeout=1.0).closed_by_client

Manual use (serves the default reply until interrupted)::

    python -m tests.loopback.openrouter --port 8089
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import select
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, NoReturn, cast

__all__ = [
    "DEFAULT_MODEL",
    "KEEPALIVE_COMMENT",
    "USAGE_COST",
    "OpenRouterServer",
    "RecordedRequest",
    "Reply",
    "main",
]

from tests.loopback.base import LoopbackServer, ScriptedReply

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "openrouter/loopback"
"""Model reported in chunks when neither the reply nor the request names one."""

KEEPALIVE_COMMENT = ": OPENROUTER PROCESSING"
"""SSE comment line OpenRouter sends while the upstream provider is busy."""

USAGE_COST = 0.00012
"""Cost (credits) reported in every usage chunk."""

_POLL_INTERVAL_S = 0.01
_SOCKET_TIMEOUT_S = 60.0
_HAS_POLL = hasattr(select, "poll")

_Failure = Literal["error", "drop", "stall"]


# --------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply(ScriptedReply):
    """One scripted answer to one chat-completions request (see `ScriptedReply` for the shared fields)."""

    keepalive_comments: bool = True
    usage: bool = True
    finish_reason: str | None = "stop"  # None: the final chunk says null, as an interrupted llama.cpp stream does
    error_code: int | str = 502  # the code of a mid-stream error chunk


@dataclass
class RecordedRequest:
    """What the server saw of one chat-completions request, and how its connection ended."""

    index: int
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    closed_at: float | None = None
    closed_by_client: bool = False
    chunks_sent: int = 0
    reply: Reply | None = None  # extension: the reply the server chose for this request

    @property
    def key(self) -> str | None:
        """The ``user`` field of the JSON body when it is a string (the key `script_for` routes on)."""
        user = self.body.get("user")
        return user if isinstance(user, str) else None

    @property
    def last_message_text(self) -> str:
        """Text of the last message in the request body ('' when there is none)."""
        return _last_message_text(self.body)

    def matches(self, key: str) -> bool:
        """True when this request is routed to ``key``: ``user == key`` or ``[[key]]`` in the last message."""
        return self.key == key or f"[[{key}]]" in self.last_message_text


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


class OpenRouterServer(LoopbackServer[Reply, RecordedRequest]):
    """Loopback OpenRouter imitation serving scripted replies from a background thread.

    A request is routed to ``key`` when its body has ``"user": key`` or its last message contains ``[[key]]``.
    """

    label = "OpenRouter"
    url_suffix = "/api/v1"

    def _initial_reply(self) -> Reply:
        return Reply()

    def _create_httpd(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        return _HTTPServer(address, self)

    def _new_record(
        self, *, index: int, path: str, headers: dict[str, str], body: dict[str, Any], received_at: float
    ) -> RecordedRequest:
        return RecordedRequest(index=index, path=path, headers=headers, body=body, received_at=received_at)


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


class _ClientGoneError(Exception):
    """The client closed (or reset) its connection."""


class _ServerStoppingError(Exception):
    """`OpenRouterServer.stop` was called while the reply was in progress."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: LoopbackServer[Any, Any]) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the host, which can stall on machines without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host.decode() if isinstance(host, bytes) else str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("error while handling a request from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OpenRouterLoopback/1.0"
    sys_version = ""
    timeout = _SOCKET_TIMEOUT_S
    disable_nagle_algorithm = True

    # socketserver hooks ---------------------------------------------------------------------------

    @property
    def _owner(self) -> LoopbackServer[Any, Any]:
        return cast(_HTTPServer, self.server).owner

    @property
    def _sock(self) -> socket.socket:
        return cast(socket.socket, self.connection)

    def setup(self) -> None:
        super().setup()
        self._owner._register(self._sock)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self._owner._unregister(self._sock)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # routes ---------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        self.close_connection = True
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            logger.debug("could not read the request body of POST %s", path, exc_info=True)
            self._close(graceful=False)
            return
        if not path.rstrip("/").endswith("/chat/completions"):
            self._not_found(path)
            return
        record = self._owner._record(path, self._header_dict(), _parse_json_object(raw))
        reply = record.reply or Reply()
        outcome: Literal["done", "dropped", "client", "stopping", "failed"]
        try:
            self._pause(reply.headers_delay_s)
            if reply.is_error:
                self._send_error_body(
                    reply.status, reply.error_message, reply.retry_after, plain_text=reply.plain_text_body
                )
                outcome = "done"
            else:
                outcome = self._stream(record, reply)
        except _ClientGoneError:
            outcome = "client"
        except _ServerStoppingError:
            outcome = "stopping"
        except OSError as exc:
            outcome = "stopping" if self._owner._stopping.is_set() else "client"
            logger.debug("write to request #%d failed: %r", record.index, exc)
        except Exception:
            logger.exception("loopback handler failed on request #%d", record.index)
            outcome = "failed"
        # Record the close before closing, so a client that has seen EOF also sees ``closed_at`` set.
        self._owner._mark_closed(record, by_client=outcome == "client")
        if outcome != "dropped":
            self._close(graceful=outcome == "done")
        logger.debug("request #%d ended: %s after %d chunks", record.index, outcome, record.chunks_sent)

    def do_GET(self) -> None:
        self.close_connection = True
        self._not_found(self.path.split("?", 1)[0])

    do_PUT = do_PATCH = do_DELETE = do_GET

    def _not_found(self, path: str) -> None:
        try:
            self._send_error_body(404, f"no route for {self.command} {path}", None)
        except (OSError, _ClientGoneError, _ServerStoppingError):
            self._close(graceful=False)
        else:
            self._close(graceful=True)

    # request parsing ------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537).strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _header_dict(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            lower = name.lower()
            headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
        return headers

    # responses ------------------------------------------------------------------------------------

    def _send_error_body(self, status: int, message: str, retry_after: str | None, *, plain_text: bool = False) -> None:
        if plain_text:
            payload, content_type = message.encode(), "text/plain; charset=utf-8"
        else:
            payload = _dumps({"error": {"code": status, "message": message, "metadata": {}}})
            content_type = "application/json"
        self._check_stopping()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Connection", "close")
        self.end_headers()
        self._write(payload)

    def _stream(self, record: RecordedRequest, reply: Reply) -> Literal["done", "dropped"]:
        requested_model = record.body.get("model")
        model = reply.model or (requested_model if isinstance(requested_model, str) else DEFAULT_MODEL)
        created = int(time.time())
        base = {
            "id": f"gen-{created}-{uuid.uuid4().hex[:20]}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

        self._check_stopping()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        if reply.keepalive_comments:
            self._write_comment()
        self._pause(reply.first_chunk_delay_s)

        chunks = list(reply.chunks)
        event = _first_failure(reply)
        for i, piece in enumerate(chunks):
            if i > 0:
                self._between_chunks(reply)
            if event is not None and event[0] == i:
                return self._fail(event[1], record, reply, base)
            delta = {"role": "assistant", "content": piece}
            self._write_data({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            self._owner._chunk_sent(record)
        if event is not None:
            if chunks:
                self._between_chunks(reply)
            return self._fail(event[1], record, reply, base)

        final = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": reply.finish_reason,
            "native_finish_reason": reply.finish_reason,
        }
        self._write_data({**base, "choices": [final]})
        if reply.usage:
            prompt_tokens = max(1, len(json.dumps(record.body.get("messages", ""))) // 4)
            completion_tokens = len(chunks)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "cost": USAGE_COST,
            }
            self._write_data({**base, "choices": [], "usage": usage})
        self._write(b"data: [DONE]\n\n")
        return "done"

    def _fail(
        self,
        kind: _Failure,
        record: RecordedRequest,
        reply: Reply,
        base: dict[str, Any],
    ) -> Literal["done", "dropped"]:
        if kind == "stall":
            logger.debug("request #%d stalls after %d chunks", record.index, record.chunks_sent)
            self._stall()
        if kind == "error":
            self._write_data(
                {
                    **base,
                    "error": {"code": reply.error_code, "message": reply.error_message},
                    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
                }
            )
            return "done"
        self._owner._mark_closed(record, by_client=False)
        self._drop(reset=reply.drop_with_reset)
        return "dropped"

    def _between_chunks(self, reply: Reply) -> None:
        if reply.keepalive_comments:
            self._write_comment()
        self._pause(reply.chunk_delay_s)

    # low-level socket work ------------------------------------------------------------------------

    def _check_stopping(self) -> None:
        if self._owner._stopping.is_set():
            raise _ServerStoppingError

    def _write(self, data: bytes) -> None:
        self._check_stopping()
        if self._peer_closed(0.0):
            raise _ClientGoneError
        try:
            self.wfile.write(data)
        except OSError as exc:
            self._check_stopping()
            raise _ClientGoneError from exc

    def _write_data(self, obj: dict[str, Any]) -> None:
        self._write(b"data: " + _dumps(obj) + b"\n\n")

    def _write_comment(self) -> None:
        self._write(KEEPALIVE_COMMENT.encode() + b"\n\n")

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` while watching for a client close (prompt) and for server stop."""
        deadline = time.monotonic() + seconds
        while True:
            self._check_stopping()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._peer_closed(min(remaining, _POLL_INTERVAL_S)):
                self._check_stopping()
                raise _ClientGoneError

    def _stall(self) -> NoReturn:
        """Hold the connection open until the client closes it or the server stops."""
        while True:
            self._check_stopping()
            if self._peer_closed(_POLL_INTERVAL_S):
                self._check_stopping()
                raise _ClientGoneError

    def _peer_closed(self, wait: float) -> bool:
        """True if the client closed or reset the connection; waits up to ``wait`` s for readability."""
        sock = self._sock
        try:
            if not _wait_readable(sock, wait):
                return False
            data = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return False
        except (OSError, ValueError):
            return True
        if not data:
            return True
        try:  # unexpected bytes from the client: discard them so the socket does not stay readable
            sock.recv(65536)
        except (BlockingIOError, InterruptedError, TimeoutError):
            pass
        except OSError:
            return True
        return False

    def _drop(self, *, reset: bool) -> None:
        sock = self._sock
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._release()

    def _close(self, *, graceful: bool) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR if graceful else socket.SHUT_RDWR)
        self._release()

    def _release(self) -> None:
        # The buffered rfile holds a reference on the socket; the descriptor is closed only when both are
        # closed. socketserver's own close afterwards is a no-op on the closed socket.
        with contextlib.suppress(OSError):
            self.rfile.close()
        self._sock.close()


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    if _HAS_POLL:  # poll has no FD_SETSIZE limit
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(max(0, math.ceil(timeout * 1000))))
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


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


def _last_message_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: [{"type": "text", "text": "..."}, ...]
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        logger.debug("request body is not JSON (%d bytes)", len(raw))
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------------
# Manual use
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the default reply until interrupted (``python -m tests.loopback.openrouter --port 8089``)."""
    parser = argparse.ArgumentParser(description="Loopback OpenRouter chat-completions server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = OpenRouterServer(host=args.host, port=args.port).start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

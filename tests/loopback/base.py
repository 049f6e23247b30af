"""The scripting and recording core shared by the loopback provider servers (OpenRouter, Anthropic)."""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

logger = logging.getLogger(__name__)

_STOP_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ScriptedReply:
    """What every loopback server's scripted reply has: the text pieces, their pacing, and the failures.

    When several of ``error_after_chunks`` / ``drop_after_chunks`` / ``stall_after_chunks`` are set, the
    one with the smallest count fires (ties: error, then drop, then stall); counts above ``len(chunks)``
    fire after the last text chunk. Each server's ``Reply`` adds its wire format's own fields.
    """

    # success stream
    chunks: Sequence[str] = ("Hello", ", ", "world")
    chunk_delay_s: float = 0.0
    first_chunk_delay_s: float = 0.0
    model: str | None = None
    # failures
    status: int = 200
    retry_after: str | None = None
    error_message: str = "scripted error"
    plain_text_body: bool = False  # an error status answered with ``error_message`` as text/plain, not JSON
    error_after_chunks: int | None = None
    drop_after_chunks: int | None = None
    drop_with_reset: bool = False
    stall_after_chunks: int | None = None
    # delay before the status line (slow provider / header timeout), for any status
    headers_delay_s: float = 0.0

    #: Optional counts that must not be negative (a subclass adds its own).
    counts: ClassVar[tuple[str, ...]] = ("error_after_chunks", "drop_after_chunks", "stall_after_chunks")

    def __post_init__(self) -> None:
        """Normalise ``chunks`` to a tuple (a bare string becomes one chunk) and validate the numbers."""
        chunks = (self.chunks,) if isinstance(self.chunks, str) else tuple(self.chunks)
        object.__setattr__(self, "chunks", chunks)
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status}")
        for name in ("chunk_delay_s", "first_chunk_delay_s", "headers_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in self.counts:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")

    @classmethod
    def ok(cls, *chunks: str, **kw: Any) -> Self:
        """A success stream of the given text pieces (the default pieces when none are given)."""
        if chunks:
            kw["chunks"] = chunks
        return cls(**kw)

    @classmethod
    def error(
        cls, status: int, retry_after: str | int | None = None, message: str = "scripted error", **kw: Any
    ) -> Self:
        """An error answered before any stream: HTTP ``status`` with the provider's JSON error body."""
        if status == 200:
            raise ValueError("Reply.error needs a non-200 status; use error_after_chunks for mid-stream errors")
        return cls(
            status=status, retry_after=None if retry_after is None else str(retry_after), error_message=message, **kw
        )

    @property
    def is_error(self) -> bool:
        """True when this reply is answered with a non-200 status before any stream."""
        return self.status != 200


class LoopbackRecord(Protocol):
    """What the core needs of a recorded request."""

    index: int
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    closed_at: float | None
    closed_by_client: bool
    chunks_sent: int
    reply: Any

    def matches(self, key: str) -> bool:
        """True when the request is routed to ``key``."""
        ...


ReplyT = TypeVar("ReplyT")
RecordT = TypeVar("RecordT", bound=LoopbackRecord)


class LoopbackServer(Generic[ReplyT, RecordT]):
    """A loopback HTTP server replaying scripted replies from a background thread and recording requests.

    Subclasses say how to build their HTTP server, their records and their default reply.
    """

    #: Shown in thread names and log lines.
    label: ClassVar[str] = "loopback"
    #: Appended to ``http://host:port`` in `base_url`.
    url_suffix: ClassVar[str] = ""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Configure the address; nothing is bound until `start`."""
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._fifo: deque[ReplyT] = deque()
        self._keyed: dict[str, deque[ReplyT]] = {}
        self._records: list[RecordT] = []
        self._default = self._initial_reply()
        self._active: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # what a subclass provides ---------------------------------------------------------------------

    def _initial_reply(self) -> ReplyT:
        raise NotImplementedError

    def _create_httpd(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        raise NotImplementedError

    def _new_record(
        self, *, index: int, path: str, headers: dict[str, str], body: dict[str, Any], received_at: float
    ) -> RecordT:
        raise NotImplementedError

    @staticmethod
    def _copy(record: RecordT) -> RecordT:
        clone = copy.copy(record)
        clone.headers = dict(record.headers)
        clone.body = dict(record.body)
        return clone

    # lifecycle ------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind the socket, start the serve thread and return self."""
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._stopping.clear()
        httpd = self._create_httpd((self._host, self._port))
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.label.lower()}-loopback-{httpd.server_address[1]}",
            daemon=True,
        )
        self._httpd, self._thread = httpd, thread
        thread.start()
        logger.info("%s loopback server listening at %s", self.label, self.base_url)
        return self

    def stop(self) -> None:
        """Stop accepting, close every open (also stalled) connection and join the server threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            active = list(self._active.items())
        for conn, _ in active:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT_S
        for _, handler_thread in active:
            handler_thread.join(max(0.0, deadline - time.monotonic()))
            if handler_thread.is_alive():
                logger.warning("handler thread %s did not finish within %ss", handler_thread.name, _STOP_JOIN_TIMEOUT_S)
        httpd.server_close()
        thread.join(max(0.0, deadline - time.monotonic()))
        self._httpd = self._thread = None
        logger.debug("%s loopback server stopped", self.label)

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` followed by `url_suffix` (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() first")
        host, port = self._httpd.server_address[:2]
        host_str = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host_str}:{port}{self.url_suffix}"

    # scripting ------------------------------------------------------------------------------------

    def script(self, *replies: ReplyT) -> None:
        """Queue replies on the global FIFO, consumed one per request in arrival order."""
        with self._lock:
            self._fifo.extend(replies)

    def script_for(self, key: str, *replies: ReplyT) -> None:
        """Queue replies for requests routed to ``key``; they are used before the global FIFO.

        Routed means: the record's ``matches(key)`` is true (subclasses document the rule).
        """
        with self._lock:
            self._keyed.setdefault(key, deque()).extend(replies)

    @property
    def default(self) -> ReplyT:
        """Reply used when no script matches (initially `_initial_reply`)."""
        with self._lock:
            return self._default

    @default.setter
    def default(self, reply: ReplyT) -> None:
        with self._lock:
            self._default = reply

    def reset(self) -> None:
        """Forget all scripts and recorded requests (the default reply is kept)."""
        with self._lock:
            self._fifo.clear()
            self._keyed.clear()
            self._records = []
            self._cond.notify_all()

    # inspection -----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordT]:
        """Snapshot copies of all recorded requests, in arrival order."""
        with self._lock:
            return [self._copy(r) for r in self._records]

    def requests_for(self, key: str) -> list[RecordT]:
        """Snapshot copies of the recorded requests routed to ``key`` (see `RecordedRequest.matches`)."""
        with self._lock:
            return [self._copy(r) for r in self._records if r.matches(key)]

    def wait_for_requests(self, n: int, *, timeout: float = 10.0, key: str | None = None) -> list[RecordT]:
        """Block until at least ``n`` requests (matching ``key`` if given) arrived; return them all.

        Raises `TimeoutError` if they do not arrive within ``timeout`` seconds.
        """

        def matching() -> list[RecordT]:
            return [r for r in self._records if key is None or r.matches(key)]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= n, timeout=timeout):
                got = matching()
                what = "requests" if key is None else f"requests for key {key!r}"
                raise TimeoutError(
                    f"expected at least {n} {what} within {timeout}s, got {len(got)} "
                    f"(all requests so far: {[(r.index, r.path) for r in self._records]})"
                )
            return [self._copy(r) for r in matching()]

    def wait_for_close(self, request: RecordT | int, *, timeout: float = 10.0) -> RecordT:
        """Block until the connection of ``request`` (a record or its index) ended; return the updated record.

        Raises `TimeoutError` if it is still open after ``timeout`` seconds.
        """
        index = request if isinstance(request, int) else request.index

        def closed() -> bool:
            return index < len(self._records) and self._records[index].closed_at is not None

        with self._cond:
            if not self._cond.wait_for(closed, timeout=timeout):
                state = (
                    "has not arrived"
                    if index >= len(self._records)
                    else f"is still open after {self._records[index].chunks_sent} chunks"
                )
                raise TimeoutError(f"request #{index} {state} (waited {timeout}s)")
            return self._copy(self._records[index])

    # called from handler threads ------------------------------------------------------------------

    def _register(self, conn: socket.socket) -> None:
        with self._lock:
            self._active[conn] = threading.current_thread()

    def _unregister(self, conn: socket.socket) -> None:
        with self._lock:
            self._active.pop(conn, None)

    def _record(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> RecordT:
        with self._cond:
            record = self._new_record(
                index=len(self._records), path=path, headers=headers, body=body, received_at=time.time()
            )
            record.reply = self._pick_reply(record)
            self._records.append(record)
            self._cond.notify_all()
            return record

    def _pick_reply(self, record: RecordT) -> ReplyT:
        # Lock held by the caller.
        for key, queue in self._keyed.items():
            if queue and record.matches(key):
                return queue.popleft()
        if self._fifo:
            return self._fifo.popleft()
        return self._default

    def _chunk_sent(self, record: RecordT) -> None:
        with self._cond:
            record.chunks_sent += 1
            self._cond.notify_all()

    def _mark_closed(self, record: RecordT, *, by_client: bool) -> None:
        with self._cond:
            if record.closed_at is None:
                record.closed_at = time.time()
                record.closed_by_client = by_client
            self._cond.notify_all()

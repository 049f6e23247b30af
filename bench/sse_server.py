"""A cheap OpenAI-compatible streaming server for the scale benchmarks: one asyncio loop, thousands of streams.

``tests/loopback/openrouter.py`` spends a thread per connection and scripts every failure; the scale
benches need neither, but do need 1,000 streams open at once without the server eating the CPU the
worker is measured on. Every ``POST .../chat/completions`` is answered with ``chunks`` text deltas,
``chunk_delay_s`` apart (the first one too), a usage chunk and ``[DONE]``, over chunked HTTP/1.1 with
keep-alive. The arrival time (``time.time()``) of each request is recorded under the ``[[key]]`` of its
last message, so a bench can measure pickup from enqueue to provider request across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.process
import re
import threading
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

_KEY = re.compile(r"\[\[([^\]]+)\]\]")
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _frame(data: Mapping[str, object] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    body = f"data: {payload}\n\n".encode()
    return f"{len(body):x}\r\n".encode() + body + b"\r\n"


class StreamingServer:
    """Serve streamed chat completions from a background thread's event loop (see the module docstring).

    Parameters:
      chunks: text deltas per answer.
      chunk_delay_s: pause before each delta, in seconds (0: as fast as the socket takes them).
    """

    def __init__(self, *, chunks: int = 3, chunk_delay_s: float = 0.0) -> None:
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.received: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        """When the last byte of each keyed request's stream was written (``time.time()``)."""
        self.requests = 0
        self.connections = 0
        """TCP connections accepted: fewer than ``requests`` when clients keep them alive."""
        self.completed = 0
        self.open_streams = 0
        self.peak_open_streams = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        """The ``OPENROUTER_BASE_URL`` to point a worker at."""
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self) -> StreamingServer:
        """Bind a free loopback port and serve from a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="bench-sse-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the bench SSE server did not start")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        loop = self._loop
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)

    def __enter__(self) -> StreamingServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            # Connections kept alive by clients are served by tasks still waiting for a next request.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:  # gather() of nothing looks for the thread's event loop, which is not set here
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request_line = await reader.readline()
        if not request_line:
            return False
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = await reader.readexactly(length) if length else b""
        received = time.time()
        self.requests += 1
        try:
            messages = json.loads(body).get("messages") or [{}]
            match = _KEY.search(str(messages[-1].get("content", "")))
        except (ValueError, AttributeError):
            match = None
        if match is not None:
            self.received.setdefault(match.group(1), received)
        self.open_streams += 1
        self.peak_open_streams = max(self.peak_open_streams, self.open_streams)
        try:
            writer.write(_HEAD)
            for index in range(self.chunks):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                writer.write(_frame({"model": "bench", "choices": [{"index": 0, "delta": {"content": f"w{index} "}}]}))
                await writer.drain()
            usage = {"prompt_tokens": 3, "completion_tokens": self.chunks, "total_tokens": 3 + self.chunks}
            final = {"model": "bench", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            writer.write(_frame(final) + _frame({"model": "bench", "choices": [], "usage": usage}) + _frame("[DONE]"))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if match is not None:
                self.ended.setdefault(match.group(1), time.time())
        finally:
            self.open_streams -= 1
        self.completed += 1
        return True


class ProcessStreamingServer:
    """``StreamingServer`` in a process of its own, as a real provider is: its loop never waits for the bench's GIL.

    The scale benches enqueue a thousand jobs from their own process while the server accepts a thousand
    connections; in one process the enqueue loop and the server took turns, and the measured pickup and
    makespan included the bench's own contention. The figures the benches read (``received``, the counters)
    are fetched from the server process on each access.
    """

    def __init__(self, *, chunks: int = 3, chunk_delay_s: float = 0.0) -> None:
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.port = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._control: Connection | None = None
        self._control_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The ``OPENROUTER_BASE_URL`` to point a worker at."""
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self) -> ProcessStreamingServer:
        """Start the server process and wait for its port."""
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        ours, theirs = context.Pipe()
        self._process = context.Process(
            target=_serve_in_process, args=(theirs, self.chunks, self.chunk_delay_s), name="bench-sse-server"
        )
        self._process.daemon = True
        self._process.start()
        if not ours.poll(30):
            raise RuntimeError("the bench SSE server process did not start")
        self.port = int(ours.recv())
        self._control = ours
        return self

    def stop(self) -> None:
        """Stop the server process."""
        if self._control is not None:
            with contextlib.suppress(OSError, EOFError), self._control_lock:
                self._control.send("stop")
            self._control.close()
            self._control = None
        if self._process is not None:
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
            self._process = None

    def __enter__(self) -> ProcessStreamingServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _stats(self) -> dict[str, Any]:
        if self._control is None:
            raise RuntimeError("the bench SSE server is not running")
        with self._control_lock:
            self._control.send("stats")
            stats: dict[str, Any] = self._control.recv()
        return stats

    @property
    def received(self) -> dict[str, float]:
        """Arrival time of each keyed request (see ``StreamingServer``)."""
        received: dict[str, float] = self._stats()["received"]
        return received

    @property
    def ended(self) -> dict[str, float]:
        """When each keyed request's stream was sent to its end (see ``StreamingServer``)."""
        ended: dict[str, float] = self._stats()["ended"]
        return ended

    @property
    def requests(self) -> int:
        """Requests served."""
        return int(self._stats()["requests"])

    @property
    def connections(self) -> int:
        """TCP connections accepted."""
        return int(self._stats()["connections"])

    @property
    def completed(self) -> int:
        """Streams sent to their end."""
        return int(self._stats()["completed"])

    @property
    def peak_open_streams(self) -> int:
        """The most streams open at once."""
        return int(self._stats()["peak_open_streams"])


def _serve_in_process(control: Connection, chunks: int, chunk_delay_s: float) -> None:
    server = StreamingServer(chunks=chunks, chunk_delay_s=chunk_delay_s).start()
    control.send(server.port)
    try:
        while True:
            try:
                command = control.recv()
            except EOFError:
                return
            if command == "stop":
                return
            control.send(
                {
                    "received": dict(server.received),
                    "ended": dict(server.ended),
                    "requests": server.requests,
                    "connections": server.connections,
                    "completed": server.completed,
                    "peak_open_streams": server.peak_open_streams,
                }
            )
    finally:
        server.stop()

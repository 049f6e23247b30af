"""Test helpers of the web side: uvicorn on a loopback port in a thread, and a plain SSE client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request

from tests.harness import wait_until


def header_user(request: Request) -> str:
    """The tests' identity: the ``X-User-Id`` header."""
    user_id = request.headers.get("X-User-Id")
    if not user_id:
        raise HTTPException(401, "no user")
    return user_id


class WebServer:
    """A FastAPI app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self._serve, name=f"web-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        """The base URL, ending in a slash."""
        return f"http://127.0.0.1:{self.port}/"

    def _serve(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def __enter__(self) -> WebServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@dataclass
class Event:
    """One server-sent event."""

    event: str
    data: str
    id: str | None


@dataclass
class StreamReading:
    """What a client saw on one connection to a job's events."""

    events: list[Event] = field(default_factory=list)
    comments: int = 0

    @property
    def last_id(self) -> str | None:
        """The id of the last event received."""
        return self.events[-1].id if self.events else None

    def of(self, kind: str) -> list[Event]:
        """The events named ``kind``."""
        return [event for event in self.events if event.event == kind]

    @property
    def done(self) -> dict[str, Any] | None:
        """The final job of the ``done`` event, if one came."""
        final = self.of("done")
        return json.loads(final[-1].data) if final else None


def apply(text: str, events: list[Event]) -> str:
    """The text a client shows after ``events``: ``text`` appends, ``reset`` clears."""
    for event in events:
        if event.event == "reset":
            text = ""
        elif event.event == "text":
            text += event.data
    return text


def read_events(
    client: httpx.Client,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    stop_after_chars: int | None = None,
    stop_after_events: int | None = None,
    timeout: float = 30.0,
) -> StreamReading:
    """Read a job's events until ``done``, or hang up once ``stop_after_chars`` of text arrived."""
    reading = StreamReading()
    chars = 0
    with client.stream("GET", url, headers=headers, timeout=timeout) as response:
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse_sse(response.iter_lines(), reading):
            reading.events.append(event)
            if event.event == "text":
                chars += len(event.data)
            if event.event == "done":
                break
            if stop_after_chars is not None and chars >= stop_after_chars:
                break
            if stop_after_events is not None and len(reading.events) >= stop_after_events:
                break
    return reading


def parse_sse(lines: Iterator[str], reading: StreamReading) -> Iterator[Event]:
    """Server-sent events from the lines of a stream, as a browser's EventSource parses them."""
    name, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield Event(name, "\n".join(data), event_id)
            name, data = "message", []
            continue
        if line.startswith(":"):
            reading.comments += 1
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[WebServer]:
    """Serve ``app`` for the duration."""
    with WebServer(app) as server:
        yield server

"""A job's event stream: the worker's live text from Redis, merged with the job store, resumable by event id.

Every event id is ``<attempt>-<offset>``: the client holds the first ``offset`` characters of attempt
``attempt``'s text. Both sources describe the same text at character offsets (the store's ``content``
always belongs to the attempt it counts), so the stream can take each character from whichever
source has it first, and resume after any id without a duplicate or a gap.

One ``JobFeed`` per job and web process reads Redis and the store for all of that job's listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from repositories.live_text import LiveEntry, stream_key
from repositories.store import Job, JobKind, JobStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Position:
    """How much of a job's text a client holds: ``offset`` characters of attempt ``attempt``."""

    attempt: int = 0
    offset: int = 0

    @classmethod
    def parse(cls, event_id: str | None) -> Position | None:
        """The position an event id names, or None when it is absent or not one of ours."""
        if not event_id:
            return None
        attempt, _, offset = event_id.strip().partition("-")
        if not (attempt.isdigit() and offset.isdigit()) or len(event_id) > 40:
            return None
        return cls(int(attempt), int(offset))

    def __str__(self) -> str:
        return f"{self.attempt}-{self.offset}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The stored job and what its status means right now (``waiting``: parked by the user's throttle)."""

    job: Job
    status: str
    reason: str


def job_json(job: Job, **extra: Any) -> dict[str, Any]:
    """The job as the web API shows it, datetimes in ISO 8601."""
    values: dict[str, Any] = {
        "job_id": job.job_id,
        "user_id": job.user_id,
        "kind": str(job.kind),
        "status": str(job.status),
        "content": job.content,
        "response": job.response,
        "error": job.error,
        "attempts": job.attempts,
        "provider": job.provider,
        "model": job.model,
        "usage": job.usage,
    }
    for name in ("created_at", "updated_at", "started_at", "finished_at"):
        moment = getattr(job, name)
        values[name] = moment.isoformat() if moment is not None else None
    values.update(extra)
    return values


@dataclass
class JobFeed:
    """One job's live entries (read once from its Redis Stream) and its latest snapshot from the store.

    Listeners wait on ``changed()``. The store is read at the start, when an attempt starts or ends, at
    a ``status`` entry (the job changed outside an attempt: a cancel), after ``idle_s`` without live
    text (doubling up to ``max_idle_s`` while the job does not change), and every ``poll_s`` while
    Redis fails.
    """

    job_id: str
    load: Callable[[], Awaitable[Snapshot | None]]
    reader: StreamReader | None
    idle_s: float = 1.0
    max_idle_s: float = 4.0
    poll_s: float = 0.5
    settle_s: float = 2.0
    """After the store says final, how long to wait for the attempt's ``end`` entry (its last text)."""
    entries: list[LiveEntry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    loaded: bool = False
    closed: bool = False
    redis_ok: bool = True
    listeners: int = 0
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _started: set[int] = field(default_factory=set)
    _ended: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    def changed(self) -> asyncio.Event:
        """An event set at the next change (take it before reading the feed, then wait on it)."""
        return self._event

    def _publish(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def refresh(self) -> Snapshot | None:
        """Read the store now."""
        self.snapshot = await self.load()
        self.loaded = True
        self._publish()
        return self.snapshot

    async def run(self) -> None:
        """Follow the job until it is final and its last text is in, or it is gone."""
        try:
            await self._follow()
        finally:
            self.closed = True
            self._publish()

    async def _follow(self) -> None:
        last_id = "0"
        settle_until: float | None = None
        loop = asyncio.get_running_loop()
        await self.refresh()
        quiet_s = self.idle_s
        while True:
            snapshot = self.snapshot
            if snapshot is None:
                return
            block_s = quiet_s
            if snapshot.job.status.is_final:
                attempt = snapshot.job.attempts
                awaiting_end = self.redis_ok and attempt in self._started and attempt not in self._ended
                settle_until = settle_until or loop.time() + self.settle_s
                if not awaiting_end or loop.time() >= settle_until:
                    return
                block_s = max(0.01, settle_until - loop.time())
            if self.reader is None:
                self.redis_ok = False
                await asyncio.sleep(self.poll_s)
                await self.refresh()
                continue
            try:
                items = await self.reader.read(stream_key(self.job_id), last_id, block_s)
            except (RedisError, OSError) as exc:
                if self.redis_ok:
                    logger.warning("live text unavailable (%s): serving from the job store", type(exc).__name__)
                self.redis_ok = False
                await asyncio.sleep(self.poll_s)
                await self.refresh()
                continue
            self.redis_ok = True
            boundary = not items
            for entry_id, fields in items:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                entry = LiveEntry.parse(fields)
                if entry is None:
                    continue
                if entry.kind == "status":
                    boundary = True  # the stored job changed outside an attempt (a cancel): re-read it now
                    continue
                self.entries.append(entry)
                if entry.kind == "reset":
                    self._started.add(entry.attempt)
                    boundary = True
                elif entry.kind == "end":
                    self._ended.add(entry.attempt)
                    boundary = True
            if items:
                quiet_s = self.idle_s
            if boundary:
                before = _state(snapshot)
                await self.refresh()
                if not items and _state(self.snapshot) == before:
                    quiet_s = min(quiet_s * 2, self.max_idle_s)
            else:
                self._publish()


def _state(snapshot: Snapshot | None) -> tuple[Any, ...] | None:
    """What a listener could learn from a snapshot."""
    if snapshot is None:
        return None
    job = snapshot.job
    return (snapshot.status, snapshot.reason, job.attempts, len(job.content), job.updated_at)


StreamItems = list[tuple[Any, dict[Any, Any]]]


@dataclass
class _Read:
    last_id: str
    deadline: float
    result: asyncio.Future[StreamItems]


class StreamReader:
    """Blocking reads of many Redis Streams served by one ``XREAD`` on one connection.

    Each ``read`` waits for entries of one stream after ``last_id``, for at most ``block_s``. A read
    that arrives while ``XREAD`` blocks without its stream unblocks it (``CLIENT UNBLOCK`` from the
    ``control`` client), so the next ``XREAD`` includes it at once.
    """

    def __init__(self, blocking: aioredis.Redis, control: aioredis.Redis) -> None:
        self.blocking = blocking
        self.control = control
        self._reads: dict[str, _Read] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client_id: int | None = None
        self._blocking_on: set[str] | None = None
        self._blocking_until = 0.0

    async def read(self, key: str, last_id: str, block_s: float) -> StreamItems:
        """The entries of ``key`` after ``last_id``; empty after ``block_s`` without any."""
        loop = asyncio.get_running_loop()
        pending = _Read(last_id, loop.time() + block_s, loop.create_future())
        self._reads[key] = pending
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="live-text-reader")
        self._wake.set()
        blocking_on, client_id = self._blocking_on, self._client_id
        stale = blocking_on is not None and (key not in blocking_on or pending.deadline < self._blocking_until)
        if stale and client_id is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.control.client_unblock(client_id)
        try:
            return await pending.result
        finally:
            if self._reads.get(key) is pending:
                del self._reads[key]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for key, pending in list(self._reads.items()):
                if pending.result.done():
                    del self._reads[key]
                elif pending.deadline <= loop.time():
                    pending.result.set_result([])
                    del self._reads[key]
            if not self._reads:
                self._wake.clear()
                await self._wake.wait()
                continue
            streams = {key: pending.last_id for key, pending in self._reads.items()}
            until = min(pending.deadline for pending in self._reads.values())
            try:
                if self._client_id is None:
                    self._client_id = int(await self.blocking.client_id())
                self._blocking_on, self._blocking_until = set(streams), until
                reply = cast(
                    "list[tuple[Any, StreamItems]] | None",
                    await self.blocking.xread(
                        streams,  # type: ignore[arg-type]
                        count=1000,
                        block=max(1, int((until - loop.time()) * 1000)),
                    ),
                )
            except (RedisError, OSError) as exc:
                self._client_id = None
                for pending in self._reads.values():
                    if not pending.result.done():
                        pending.result.set_exception(exc)
                self._reads.clear()
                continue
            finally:
                self._blocking_on = None
            for raw_key, items in reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                answered = self._reads.pop(key, None)
                if answered is not None and not answered.result.done():
                    answered.result.set_result(items)
            # Let the feeds that just got entries ask again before the next XREAD starts.
            for _ in range(3):
                await asyncio.sleep(0)

    async def close(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class FeedHub:
    """The feeds of one web process: one per job being watched, shared by its listeners.

    All feeds read their Redis Streams through one ``StreamReader`` (one connection that blocks).
    """

    def __init__(self, redis_url: str | None, *, idle_s: float = 1.0, poll_s: float = 0.5) -> None:
        self.reader: StreamReader | None = None
        self._clients: list[aioredis.Redis] = []
        if redis_url:
            options: dict[str, Any] = {"socket_connect_timeout": 2, "health_check_interval": 30}
            # No silent reconnect on the blocking connection: its client id must stay the one CLIENT UNBLOCK names.
            blocking = aioredis.Redis.from_url(
                redis_url, single_connection_client=True, retry=Retry(NoBackoff(), 0), **options
            )
            control = aioredis.Redis.from_url(redis_url, **options)
            self._clients = [blocking, control]
            self.reader = StreamReader(blocking, control)
        self.idle_s = idle_s
        self.poll_s = poll_s
        self._feeds: dict[str, JobFeed] = {}

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, load: Callable[[], Awaitable[Snapshot | None]]) -> AsyncIterator[JobFeed]:
        """The job's feed, started on first use and stopped when its last listener leaves."""
        feed = self._feeds.get(job_id)
        if feed is None or feed.closed:
            feed = JobFeed(job_id, load, self.reader, idle_s=self.idle_s, poll_s=self.poll_s)
            feed.task = asyncio.create_task(feed.run(), name=f"feed-{job_id}")
            self._feeds[job_id] = feed
        feed.listeners += 1
        try:
            yield feed
        finally:
            feed.listeners -= 1
            if feed.listeners == 0 and self._feeds.get(job_id) is feed:
                del self._feeds[job_id]
                if feed.task is not None and not feed.task.done():
                    feed.task.cancel()

    async def close(self) -> None:
        """Stop every feed and close the Redis client."""
        for feed in list(self._feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
        self._feeds.clear()
        if self.reader is not None:
            await self.reader.close()
        for client in self._clients:
            await client.aclose()


@dataclass
class _Listener:
    """One client's place in the job's text, and what it was last told."""

    position: Position
    status: tuple[str, str] | None = None

    def move_to(self, attempt: int) -> list[ServerSentEvent]:
        """Follow a newer attempt; the client is told to drop its text if it holds any."""
        had_text = self.position.offset > 0
        self.position = Position(attempt, 0)
        return [ServerSentEvent(data="", event="reset", id=str(self.position))] if had_text else []

    def text(self, offset: int, text: str) -> list[ServerSentEvent]:
        """The part of ``text`` (at ``offset`` of the current attempt) the client does not hold yet."""
        end = offset + len(text)
        if end <= self.position.offset or offset > self.position.offset:
            return []
        new = text[self.position.offset - offset :]
        self.position = Position(self.position.attempt, end)
        return [ServerSentEvent(data=new, event="text", id=str(self.position))]

    def from_store(self, snapshot: Snapshot) -> list[ServerSentEvent]:
        """Whatever the stored job adds: a newer attempt, more text, a new status."""
        job = snapshot.job
        events: list[ServerSentEvent] = []
        if job.attempts > self.position.attempt:
            events += self.move_to(job.attempts)
        # A completed preview stores the tidied preview, not the streamed text: it is in ``done``.
        text_is_stream = not (job.kind is JobKind.PREVIEW and job.status is JobStatus.COMPLETED)
        if job.attempts == self.position.attempt and text_is_stream:
            events += self.text(0, job.content)
        status = (snapshot.status, snapshot.reason)
        if status != self.status:
            self.status = status
            data = json.dumps({"status": snapshot.status, "reason": snapshot.reason})
            events.append(ServerSentEvent(data=data, event="status", id=str(self.position)))
        return events


async def job_events(
    feed: JobFeed, start: Position | None, *, gap_wait_s: float = 0.25
) -> AsyncIterator[ServerSentEvent]:
    """The job's events after ``start`` (from the beginning when None), ending with ``done``."""
    listener = _Listener(start or Position())
    index = 0
    while True:
        changed = feed.changed()
        if not feed.loaded:
            await changed.wait()
            continue
        while index < len(feed.entries):
            entry = feed.entries[index]
            if entry.attempt > listener.position.attempt:
                for event in listener.move_to(entry.attempt):
                    yield event
            if entry.kind == "text" and entry.attempt == listener.position.attempt:
                if entry.offset > listener.position.offset:
                    filled = await _fill_gap(feed, listener, entry, gap_wait_s)
                    if filled is None:
                        break  # the store has not caught up yet: try again at the next change
                    for event in filled:
                        yield event
                for event in listener.text(entry.offset, entry.text):
                    yield event
            index += 1
        snapshot = feed.snapshot
        if snapshot is not None:
            for event in listener.from_store(snapshot):
                yield event
        if feed.closed:
            job = snapshot.job if snapshot is not None else None
            data = json.dumps(job_json(job) if job is not None else None)
            yield ServerSentEvent(data=data, event="done", id=str(listener.position))
            return
        await changed.wait()


async def _fill_gap(
    feed: JobFeed, listener: _Listener, entry: LiveEntry, wait_s: float
) -> list[ServerSentEvent] | None:
    """The text before ``entry`` that Redis lacks (trimmed, or dropped while it failed), from the store.

    None when the store has not caught up yet.
    """
    snapshot = await feed.refresh()
    if snapshot is None or snapshot.job.attempts != entry.attempt:
        return []  # gone, or a newer attempt: the store's view takes over
    content = snapshot.job.content
    if len(content) < entry.offset:
        await asyncio.sleep(wait_s)
        return None
    return listener.text(0, content[: entry.offset])

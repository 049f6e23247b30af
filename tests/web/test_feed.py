"""How a job's events are merged from the live stream and the store, and resumed by event id."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import redis
import redis.asyncio as aioredis

from repositories.live_text import LiveEntry, RedisLiveText, stream_key
from repositories.store import Job, JobKind, JobStatus
from tests.conftest import TEST_REDIS_URL
from tests.web.support import Event, apply
from web.feed import JobFeed, Position, Snapshot, StreamReader, job_events


def _job(status: JobStatus, content: str, attempts: int = 1, kind: JobKind = JobKind.GENERATE) -> Job:
    now = datetime.now(UTC)
    return Job(
        job_id="j",
        user_id="u",
        kind=kind,
        status=status,
        content=content,
        request={},
        response=None,
        error=None,
        attempts=attempts,
        provider=None,
        model=None,
        usage=None,
        created_at=now,
        updated_at=now,
        started_at=now,
        finished_at=None,
        lease_owner=None,
        heartbeat_at=None,
        enqueued_at=None,
    )


def _events(entries: list[LiveEntry], job: Job, start: Position | None = None) -> list[Event]:
    """Every event a client gets from a feed that already holds ``entries`` and the final ``job``."""

    async def collect() -> list[Event]:
        async def load() -> Snapshot:
            return Snapshot(job, str(job.status), "")

        feed = JobFeed("j", load, None)
        feed.entries = entries
        feed.snapshot = await load()
        feed.loaded = feed.closed = True
        return [Event(str(e.event), str(e.data), e.id) async for e in job_events(feed, start)]

    return asyncio.run(collect())


def test_position_round_trips_and_rejects_foreign_ids() -> None:
    assert Position.parse("3-120") == Position(3, 120)
    assert str(Position(3, 120)) == "3-120"
    for foreign in (None, "", "abc", "1-", "-1-2", "1-2-3", "9" * 50 + "-1"):
        assert Position.parse(foreign) is None


def test_live_text_and_store_text_overlap_without_duplicating() -> None:
    entries = [LiveEntry("reset", 1), LiveEntry("text", 1, 0, "Hello"), LiveEntry("text", 1, 5, ", wor")]
    events = _events(entries, _job(JobStatus.COMPLETED, "Hello, world"))
    assert apply("", events) == "Hello, world"
    assert [e.id for e in events if e.event == "text"] == ["1-5", "1-10", "1-12"]
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["status"] == "completed"


def test_a_resume_starts_exactly_after_the_given_id() -> None:
    entries = [LiveEntry("text", 1, 0, "abc"), LiveEntry("text", 1, 3, "def")]
    events = _events(entries, _job(JobStatus.COMPLETED, "abcdefg"), Position(1, 4))
    assert apply("abcd", events) == "abcdefg"
    assert not [e for e in events if e.event == "reset"]


def test_a_newer_attempt_resets_a_client_holding_older_text() -> None:
    entries = [LiveEntry("text", 1, 0, "old"), LiveEntry("reset", 2), LiveEntry("text", 2, 0, "new")]
    events = _events(entries, _job(JobStatus.COMPLETED, "new text", attempts=2))
    assert [e.event for e in events][:3] == ["text", "reset", "text"]
    assert apply("", events) == "new text"


def test_a_client_resuming_into_a_newer_attempt_is_reset_once() -> None:
    entries = [LiveEntry("reset", 2), LiveEntry("text", 2, 0, "new")]
    events = _events(entries, _job(JobStatus.COMPLETED, "new", attempts=2), Position(1, 7))
    assert [e.event for e in events if e.event != "status"] == ["reset", "text", "done"]
    assert apply("stale t", events) == "new"


def test_a_gap_in_the_live_text_is_filled_from_the_store() -> None:
    entries = [LiveEntry("text", 1, 0, "ab"), LiveEntry("text", 1, 5, "fg")]
    events = _events(entries, _job(JobStatus.COMPLETED, "abcdefg"))
    assert apply("", events) == "abcdefg"


def test_a_completed_preview_keeps_its_streamed_text_and_reports_the_preview_in_done() -> None:
    entries = [LiveEntry("text", 1, 0, "A  raw\npreview")]
    events = _events(entries, _job(JobStatus.COMPLETED, "A raw preview", kind=JobKind.PREVIEW))
    assert apply("", events) == "A  raw\npreview"
    assert json.loads(events[-1].data)["content"] == "A raw preview"


def test_a_status_entry_makes_the_feed_read_the_store_at_once_and_is_no_text_entry() -> None:
    async def scenario() -> tuple[float, list[LiveEntry], str | None]:
        client = redis.Redis.from_url(TEST_REDIS_URL)
        blocking = aioredis.Redis.from_url(TEST_REDIS_URL, single_connection_client=True)
        control = aioredis.Redis.from_url(TEST_REDIS_URL)
        job_id = uuid.uuid4().hex
        stored = [_job(JobStatus.PENDING, "", attempts=0)]

        async def load() -> Snapshot:
            return Snapshot(stored[-1], str(stored[-1].status), "")

        # Given a feed of a pending job that reads the store only after 30 s without live text
        reader = StreamReader(blocking, control)
        feed = JobFeed(job_id, load, reader, idle_s=30.0)
        task = asyncio.create_task(feed.run())
        try:
            while not feed.loaded:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the feed's XREAD is blocking now
            # When the job is cancelled in the store and a cancel writes a status entry
            stored.append(_job(JobStatus.CANCELLED, "", attempts=0))
            started = time.monotonic()
            await asyncio.to_thread(RedisLiveText(client).status_changed, job_id)
            # Then the feed reads the store at once, sees the final job and closes (no attempt to wait for)
            await asyncio.wait_for(task, timeout=5)
            snapshot = feed.snapshot
            return time.monotonic() - started, feed.entries, snapshot.status if snapshot else None
        finally:
            task.cancel()
            await reader.close()
            client.delete(stream_key(job_id))
            await blocking.aclose()
            await control.aclose()

    elapsed, entries, status = asyncio.run(scenario())
    assert status == "cancelled"
    assert entries == []
    assert elapsed < 1.0

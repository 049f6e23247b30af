"""The web API against the real app: uvicorn on loopback, a real worker, real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import actors
from actors.queue import current
from repositories.live_text import LiveEntry, stream_key
from repositories.store import JobStatus
from tests.conftest import unique
from tests.harness import PROJECT_ROOT
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import Reply
from tests.web.support import StreamReading, WebServer, apply, header_user, parse_sse, read_events
from web.api import JobStreams, build_router, default_tokens
from web.app import create_app
from web.feed import FeedHub

pytestmark = pytest.mark.integration


def _submit(http: httpx.Client, user: str, key: str) -> dict[str, object]:
    response = http.post("jobs", json={"params": params(key), "job_id": key}, headers={"X-User-Id": user})
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def test_another_users_job_is_not_found_on_every_route(stack: Stack, http: httpx.Client) -> None:
    # Given a job of user A
    key = unique("iso")
    stack.server.script_for(key, Reply.ok("secret ", "text"))
    job = _submit(http, unique("a"), key)
    other = {"X-User-Id": unique("b")}
    # When user B asks for it by every route
    # Then every one answers 404, and B's list does not show it
    assert http.get(f"jobs/{key}", headers=other).status_code == 404
    assert http.post(f"jobs/{key}/cancel", headers=other).status_code == 404
    assert http.get(f"jobs/{key}/events", headers=other).status_code == 404
    assert http.get("jobs", headers=other).json() == []
    # and A's stream token opens A's job's events, not another job's
    token = job["stream_token"]
    done = read_events(http, f"jobs/{key}/events?token={token}").done
    assert done is not None
    assert done["content"] == "secret text"
    other_key = _submit(http, other["X-User-Id"], unique("iso"))["job_id"]
    assert http.get(f"jobs/{other_key}/events?token={token}").status_code == 401


def test_the_owner_lists_reads_and_filters_their_jobs(stack: Stack, http: httpx.Client) -> None:
    user = unique("u")
    key = unique("list")
    stack.server.script_for(key, Reply.ok("one"))
    _submit(http, user, key)
    stack.wait_for_status(key)
    listed = http.get("jobs", params={"status": "completed"}, headers={"X-User-Id": user}).json()
    assert [job["job_id"] for job in listed] == [key]
    assert http.get("jobs", params={"status": "pending"}, headers={"X-User-Id": user}).json() == []
    read = http.get(f"jobs/{key}", headers={"X-User-Id": user}).json()
    assert read["status"] == "completed"
    assert read["content"] == "one"
    assert read["created_at"].endswith("+00:00")


def test_a_stream_resumed_with_last_event_id_mid_stream_has_no_gap_and_no_duplicate(
    stack: Stack, http: httpx.Client
) -> None:
    # Given a job streaming 60 numbered pieces
    key = unique("resume")
    pieces = [f"<{i}>" for i in range(60)]
    stack.server.script_for(key, Reply.ok(*pieces, chunk_delay_s=0.03))
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    # When a client hangs up in the middle and reconnects with the last id it saw
    first = read_events(http, f"jobs/{key}/events", headers=user, stop_after_chars=40)
    assert first.done is None
    second = read_events(http, f"jobs/{key}/events", headers={**user, "Last-Event-ID": str(first.last_id)})
    # Then the two connections together hold the whole text exactly once
    assert apply("", first.events + second.events) == "".join(pieces)
    assert second.done is not None
    assert second.done["status"] == "completed"
    assert len(first.of("text")) + len(second.of("text")) >= 3


def test_a_retry_resets_the_text_and_a_resume_across_it_does_not_duplicate(stack: Stack, http: httpx.Client) -> None:
    # Given a first attempt that breaks mid-stream after some text, and a second that completes
    key = unique("retry")
    stack.server.script_for(
        key,
        Reply.ok("first ", "try ", "text ", "more", chunk_delay_s=0.2, error_after_chunks=3),
        Reply.ok("second ", "attempt ", "wins", chunk_delay_s=0.2),
    )
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    # When a client reads part of the first attempt, hangs up, and resumes after the retry started
    first = read_events(http, f"jobs/{key}/events", headers=user, stop_after_chars=6)
    assert apply("", first.events).startswith("first ")
    wait_until(lambda: (job := stack.store.get(key)) and job.attempts == 2, timeout=20, what="the second attempt")
    second = read_events(http, f"jobs/{key}/events", headers={**user, "Last-Event-ID": str(first.last_id)})
    # Then it is told to reset, and ends with the second attempt's text exactly once
    assert second.of("reset"), second.events
    assert apply("", first.events + second.events) == "second attempt wins"
    assert second.done is not None
    assert second.done["attempts"] == 2
    # and a client that followed the whole job on one connection shows the same text
    whole = read_events(http, f"jobs/{key}/events", headers=user)
    assert apply("", whole.events) == "second attempt wins"


def test_a_one_megabyte_answer_streams_whole(stack: Stack, http: httpx.Client) -> None:
    # Given an answer of 1 MB in 1000 pieces of distinct text
    key = unique("big")
    pieces = [f"{i:06d}" + "x" * 994 + "\n" for i in range(1000)]
    stack.server.script_for(key, Reply.ok(*pieces))
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    # When a client follows its events from the start
    reading = read_events(http, f"jobs/{key}/events", headers=user, timeout=60)
    # Then it receives every character once, and the same text the store has
    text = apply("", reading.events)
    assert len(text) == 1_001_000
    assert text == "".join(pieces)
    assert reading.done is not None
    assert reading.done["content"] == text


def test_cancel_through_the_api_stops_the_provider_stream_within_a_second(stack: Stack, http: httpx.Client) -> None:
    # Given a job streaming slowly
    key = unique("cancel")
    stack.server.script_for(key, Reply.ok(*["tick "] * 400, chunk_delay_s=0.05))
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    wait_until(lambda: (job := stack.store.get(key)) and job.content, timeout=20, what="text to arrive")
    # When its user cancels it through the API
    response = http.post(f"jobs/{key}/cancel", headers=user)
    returned_at = time.time()
    # Then the answer says so, the provider connection closes within 1 s, and the stream ends cancelled
    assert response.json() == {"cancelled": True}
    request = stack.server.wait_for_close(stack.server.requests_for(key)[0], timeout=5)
    assert request.closed_by_client
    assert request.closed_at is not None
    assert request.closed_at - returned_at < 1.0
    reading = read_events(http, f"jobs/{key}/events", headers=user)
    assert reading.done is not None
    assert reading.done["status"] == "cancelled"
    assert apply("", reading.events) == reading.done["content"] != ""
    assert http.post(f"jobs/{key}/cancel", headers=user).json() == {"cancelled": False}


def test_the_stream_falls_back_to_the_store_after_the_live_stream_expired(stack: Stack, http: httpx.Client) -> None:
    # Given a finished job whose live stream in Redis has expired
    key = unique("expired")
    stack.server.script_for(key, Reply.ok("kept ", "in ", "sql"))
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    stack.wait_for_status(key)
    redis = actors.broker.client
    wait_until(
        lambda: 0 < redis.ttl(stream_key(key)) <= 600, timeout=5, what="the live stream's expiry after the job ended"
    )
    redis.pexpire(stream_key(key), 1)
    wait_until(lambda: not redis.exists(stream_key(key)), timeout=5, what="the live stream to expire")
    # When a client opens its events
    reading = read_events(http, f"jobs/{key}/events", headers=user)
    # Then the store serves the whole text and the outcome
    assert apply("", reading.events) == "kept in sql"
    assert reading.done is not None
    assert reading.done["status"] == "completed"


def test_a_running_job_streams_from_the_store_when_redis_is_unreachable(stack: Stack) -> None:
    # Given a web app whose Redis for live text is unreachable, and a job streaming slowly
    app = create_app(identity=header_user, redis_url="redis://127.0.0.1:9/0", ping_s=1)
    key = unique("noredis")
    pieces = [f"[{i}]" for i in range(20)]
    stack.server.script_for(key, Reply.ok(*pieces, chunk_delay_s=0.1))
    user = {"X-User-Id": unique("u")}
    with WebServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        _submit(http, user["X-User-Id"], key)
        # When a client follows its events
        reading = read_events(http, f"jobs/{key}/events", headers=user)
    # Then the text arrives from the store, in several pieces, whole and once
    assert apply("", reading.events) == "".join(pieces)
    assert len(reading.of("text")) >= 3
    assert reading.done is not None
    assert reading.done["status"] == str(JobStatus.COMPLETED)


def test_an_idle_stream_sends_keep_alive_comments(stack: Stack, http: httpx.Client) -> None:
    # Given a job whose provider is silent for 2.5 s before answering
    key = unique("idle")
    stack.server.script_for(key, Reply.ok("late", first_chunk_delay_s=2.5))
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    # When a client follows it (the app pings every second)
    reading = read_events(http, f"jobs/{key}/events", headers=user)
    # Then keep-alive comments arrived while it waited
    assert reading.comments >= 1
    assert apply("", reading.events) == "late"


def test_the_worker_writes_each_attempts_text_to_its_live_stream(stack: Stack, http: httpx.Client) -> None:
    # Given a job that completes
    key = unique("live")
    stack.server.script_for(key, Reply.ok("live ", "text ", "here", chunk_delay_s=0.1))
    _submit(http, unique("u"), key)
    job = stack.wait_for_status(key)

    # When the live stream in Redis is read (the end entry follows the stored outcome)
    def read_stream() -> list[LiveEntry]:
        items: list[tuple[Any, dict[Any, Any]]] = actors.broker.client.xrange(stream_key(key))  # type: ignore[assignment]
        return [entry for _, fields in items if (entry := LiveEntry.parse(fields)) is not None]

    wait_until(lambda: read_stream()[-1].kind == "end", timeout=5, what="the end entry")
    entries = read_stream()
    # Then it says the attempt began, holds its text at matching offsets, and that it ended
    assert entries[0] == LiveEntry("reset", 1)
    assert entries[-1] == LiveEntry("end", 1)
    texts = [entry for entry in entries if entry.kind == "text"]
    assert "".join(entry.text for entry in texts) == job.content == "live text here"
    assert [entry.offset for entry in texts] == [sum(len(t.text) for t in texts[:i]) for i in range(len(texts))]


def test_python_m_web_prints_its_url_and_serves_with_the_dev_identity(stack: Stack) -> None:
    env = {**stack.env, "WEB_DEV_IDENTITY": "true"}
    process = subprocess.Popen(
        [sys.executable, "-m", "web", "--host", "127.0.0.1", "--port", "0"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("web: serving at http://127.0.0.1:"), line
        url = line.split("serving at ", 1)[1].strip()
        assert httpx.get(url + "jobs", headers={"X-User-Id": unique("u")}).json() == []
        assert "operator" in httpx.get(url + "operator").text
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert "WEB_DEV_IDENTITY is on" in stderr


def test_python_m_web_refuses_to_start_without_an_identity(stack: Stack) -> None:
    env = {**stack.env, "WEB_DEV_IDENTITY": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "web", "--port", "0"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "WEB_DEV_IDENTITY" in result.stderr


def test_a_redelivery_after_a_worker_crash_resets_the_stream_without_duplicating(
    stack: Stack, http: httpx.Client
) -> None:
    # Given a client following a job on a worker that stalls half-way through the first attempt
    stack.worker.stop()
    doomed = stack.new_worker(f"web-doomed-{stack.backend}").start()
    key = unique("crash")
    stack.server.script_for(key, Reply.ok("first ", "attempt", stall_after_chunks=1), Reply.ok("second ", "life"))
    user = {"X-User-Id": unique("u")}
    _submit(http, user["X-User-Id"], key)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        following = pool.submit(read_events, http, f"jobs/{key}/events", headers=user, timeout=90)
        try:
            wait_until(
                lambda: (job := stack.store.get(key)) and job.content == "first ", timeout=15, what="partial text"
            )
            # When that worker is killed and another takes the message over
            doomed.kill()
        finally:
            stack.worker.start()
        reading = following.result(timeout=90)
    # Then the client was told to reset once, and shows the second attempt's text exactly
    assert reading.of("text")[0].data == "first ", reading.events
    assert len(reading.of("reset")) == 1, reading.events
    assert apply("", reading.events) == "second life", reading.events
    assert reading.done is not None
    assert reading.done["attempts"] == 2


def test_a_job_parked_by_its_users_throttle_streams_a_waiting_status(stack: Stack, http: httpx.Client) -> None:
    # Given a user already running as many jobs as the limit allows (5), each streaming for a few seconds
    user = unique("busy")
    busy_jobs = [unique("busy-job") for _ in range(5)]
    for busy in busy_jobs:
        stack.server.script_for(busy, Reply.ok(*["b "] * 15, chunk_delay_s=0.4))
        _submit(http, user, busy)
    # (all five started: otherwise the next job may take a slot first and one of these is parked instead)
    for busy in busy_jobs:
        stack.wait_for_status(busy, JobStatus.PROCESSING)
    key = unique("parked")
    stack.server.script_for(key, Reply.ok("my ", "turn"))
    # When one more job of that user is followed
    _submit(http, user, key)
    reading = read_events(http, f"jobs/{key}/events", headers={"X-User-Id": user}, timeout=60)
    # Then its stream said it was waiting for the throttle, and later that it completed
    statuses = [json.loads(event.data) for event in reading.of("status")]
    waiting = [status for status in statuses if status["status"] == "waiting"]
    assert waiting, statuses
    assert "throttled" in waiting[0]["reason"]
    assert statuses[-1]["status"] == "completed"
    assert apply("", reading.events) == "my turn"


class _RareStoreReads(JobStreams):
    """Feeds that re-read the store only after 30 s without live text: a change shows in time only if it wakes them."""

    def hub(self) -> FeedHub:
        if self._hub is None:
            self._hub = FeedHub(self.redis_url, idle_s=30.0)
        return self._hub


def _app_with_rare_store_reads() -> FastAPI:
    streams = _RareStoreReads(tokens=default_tokens(), redis_url=current().settings.redis_url, ping_s=0.2)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await streams.close()

    app = FastAPI(lifespan=lifespan)
    app.include_router(build_router(header_user, streams=streams))
    return app


def test_a_parked_job_cancelled_through_the_api_shows_cancelled_on_its_open_stream_at_once(
    stack: Stack, http: httpx.Client
) -> None:
    # Given a user running as many jobs as the limit allows (5), each streaming for half a minute
    user = {"X-User-Id": unique("full")}
    busy = [unique("long") for _ in range(5)]
    for job_id in busy:
        stack.server.script_for(job_id, Reply.ok(*["b "] * 300, chunk_delay_s=0.1))
        _submit(http, user["X-User-Id"], job_id)
    try:
        wait_until(
            lambda: all((job := stack.store.get(j)) and job.status is JobStatus.PROCESSING for j in busy),
            timeout=20,
            what="the user's jobs to run",
        )
        # and one more job of theirs, parked by the throttle, followed by a web app whose feeds wait 30 s
        # for live text before they re-read the store (so only the cancel itself can wake them in time)
        key = unique("parked")
        stack.server.script_for(key, Reply.ok("never ", "runs"))
        _submit(http, user["X-User-Id"], key)
        with WebServer(_app_with_rare_store_reads()) as server, httpx.Client(base_url=server.url) as client:
            reading = StreamReading()
            seen: list[tuple[float, dict[str, Any]]] = []
            cancel_sent: float | None = None
            stop_at = time.monotonic() + 20

            def lines(response: httpx.Response) -> Iterator[str]:
                for line in response.iter_lines():  # keep-alive comments every 0.2 s: the deadline is checked
                    yield line
                    if time.monotonic() > stop_at:
                        return

            with client.stream("GET", f"jobs/{key}/events", headers=user, timeout=30) as response:
                for event in parse_sse(lines(response), reading):
                    reading.events.append(event)
                    if event.event == "done":
                        break
                    if event.event != "status":
                        continue
                    seen.append((time.monotonic(), json.loads(event.data)))
                    if cancel_sent is None:
                        # When, its stream open and showing it queued, the user cancels it through the API
                        assert seen[0][1]["status"] in ("pending", "waiting"), seen
                        assert stack.store.get(key).status is JobStatus.PENDING  # type: ignore[union-attr]
                        cancel_sent = time.monotonic()
                        assert http.post(f"jobs/{key}/cancel", headers=user).json() == {"cancelled": True}
                        stop_at = cancel_sent + 1.0
        # Then the open stream says cancelled within 1 s of the cancel, and ends with the cancelled job
        assert cancel_sent is not None
        shown = [at - cancel_sent for at, status in seen if status["status"] == "cancelled"]
        assert shown, f"no cancelled status within 1 s of the cancel: {seen}"
        assert shown[0] < 1.0
        assert reading.done is not None
        assert reading.done["status"] == "cancelled"
        assert stack.server.requests_for(key) == []
    finally:
        for job_id in busy:
            http.post(f"jobs/{job_id}/cancel", headers=user)

"""One event loop per worker process, pooled provider connections, and progress written in batches."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from actors.jobs import Delivery, JobRunner, RetryPolicy
from actors.payloads import GenerateMessage
from actors.progress import ProgressWriter, Running
from actors.stream_loop import StreamLoop
from bench.sse_server import StreamingServer
from middleware.busy_threads import BusyThreads
from repositories.chat import ChatMessage, ChatRequest, Finished, LoopClients, StreamEvent, close_clients
from repositories.openrouter import OpenRouterProvider
from repositories.scripted import ScriptedProvider, ScriptedReply
from repositories.store import Heartbeat, JobKind, JobStatus, JobStore
from tests.conftest import unique
from tests.harness import wait_until


class LoopRecordingProvider(ScriptedProvider):
    """A scripted provider that notes the event loop and thread each stream ran on."""

    def __init__(self) -> None:
        super().__init__([ScriptedReply(pieces=("a", "b"), delay_s=0.05)])
        self.loops: list[int] = []
        self.threads: list[int] = []
        self.finished = 0

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.loops.append(id(asyncio.get_running_loop()))
        self.threads.append(threading.get_ident())
        async for event in super().stream(request):
            if isinstance(event, Finished):
                self.finished += 1
            yield event


def _generate(job_id: str) -> GenerateMessage:
    return GenerateMessage.model_validate(
        {
            "job_id": job_id,
            "user_id": unique("u"),
            "params": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        }
    )


def _claimed(store: JobStore, job_id: str, owner: str) -> None:
    store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={}, enqueued=True)
    assert store.claim(job_id, owner=owner, message_id="m", lease_s=30, user_id="u1", kind=JobKind.GENERATE)


def _run_on_threads(runner: JobRunner, job_ids: list[str]) -> list[threading.Thread]:
    """Start one worker thread per job, each running its generate message through ``runner``."""
    threads = [
        threading.Thread(target=runner.run_generation, args=(_generate(job_id), Delivery(message_id=job_id, retries=0)))
        for job_id in job_ids
    ]
    for thread in threads:
        thread.start()
    return threads


def test_every_attempt_of_a_process_streams_on_one_event_loop(sqlite_store: JobStore) -> None:
    # Given one runner (one worker process) and four jobs run by four worker threads at once
    provider = LoopRecordingProvider()
    runner = JobRunner(
        store=sqlite_store,
        provider_factory=lambda: provider,
        preview_model="p",
        retry_policy=RetryPolicy(min_backoff_ms=100, max_backoff_ms=400),
        progress_interval_s=0.05,
    )
    job_ids = [unique("job") for _ in range(4)]
    threads = _run_on_threads(runner, job_ids)
    for thread in threads:
        thread.join(timeout=30)
    # Then every job completed, and all four streams ran on the same loop, in a thread of its own
    assert [sqlite_store.get(job_id).status for job_id in job_ids] == [JobStatus.COMPLETED] * 4  # type: ignore[union-attr]
    assert len(set(provider.loops)) == 1
    assert set(provider.threads).isdisjoint(thread.ident for thread in threads)


class _SlowCompletions(JobStore):
    """A job store whose completions wait for the test, counting how many run at once."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0
        self.release = threading.Event()

    def complete(self, job_id: str, **fields: Any) -> bool:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.release.wait(10)
        try:
            return super().complete(job_id, **fields)
        finally:
            with self.lock:
                self.inside -= 1


class _StartTogetherProvider(LoopRecordingProvider):
    """Streams that answer only once ``together`` of them have started: none ends while a job still starts."""

    def __init__(self, together: int) -> None:
        super().__init__()
        self.together = together

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        deadline = time.monotonic() + 10
        started = super().stream(request)
        first = await anext(started)  # the parent notes the stream's loop as it starts
        while len(self.loops) < self.together and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        yield first
        async for event in started:
            yield event


def test_only_a_few_threads_run_outside_their_streams_at_once_when_many_streams_end_together(
    sqlite_store: JobStore,
) -> None:
    # Given a runner whose threads run outside their streams two at a time, and five jobs on five threads
    store = _SlowCompletions(sqlite_store.engine)
    provider = _StartTogetherProvider(together=5)
    runner = JobRunner(
        store=store,
        provider_factory=lambda: provider,
        preview_model="p",
        retry_policy=RetryPolicy(min_backoff_ms=100, max_backoff_ms=400),
        busy=BusyThreads(2),
    )
    job_ids = [unique("job") for _ in range(5)]
    threads = _run_on_threads(runner, job_ids)
    # When all five streams have ended while the first completions are still being written
    wait_until(
        lambda: provider.finished == 5 and store.inside == 2,
        timeout=10,
        what="five streams ended, two completions being written",
    )
    store.release.set()
    for thread in threads:
        thread.join(timeout=30)
    # Then never more than two threads recorded at once (the others waited for a slot), and every job completed
    assert store.most_inside == 2
    assert [store.get(job_id).status for job_id in job_ids] == [JobStatus.COMPLETED] * 5  # type: ignore[union-attr]


def test_a_keep_alive_provider_reuses_its_connection_for_the_next_stream() -> None:
    # Given a streaming server that keeps connections alive, and the worker's one stream loop
    request = ChatRequest(model="m", messages=[ChatMessage(role="user", content="hi")])
    loop = StreamLoop()

    async def drain(provider: OpenRouterProvider) -> None:
        async for _ in provider.stream(request):
            pass

    try:
        with StreamingServer(chunks=2) as server:
            pooled = OpenRouterProvider(base_url=server.base_url, api_key=None, keep_alive=True)
            # When three streams run one after another through a keep-alive provider
            for _ in range(3):
                loop.run(drain(pooled))
            # Then they shared one connection
            assert (server.requests, server.connections) == (3, 1)
            # While a provider without keep-alive opens one per stream
            single = OpenRouterProvider(base_url=server.base_url, api_key=None)
            for _ in range(2):
                loop.run(drain(single))
            assert (server.requests, server.connections) == (5, 3)
    finally:
        loop.close()


def test_heartbeats_of_many_jobs_are_one_call_and_name_the_leases_lost(sqlite_store: JobStore) -> None:
    # Given three running jobs, one of which was cancelled meanwhile
    jobs = [(unique("job"), unique("owner")) for _ in range(3)]
    for job_id, owner in jobs:
        _claimed(sqlite_store, job_id, owner)
    assert sqlite_store.cancel(jobs[2][0], user_id="u1")
    # When their heartbeats and texts are written together
    lost = sqlite_store.heartbeat_many(
        [Heartbeat(jobs[0][0], jobs[0][1], "first"), Heartbeat(jobs[1][0], jobs[1][1]), Heartbeat(*jobs[2], "late")]
    )
    # Then only the cancelled job's lease is reported lost, and only held rows got text
    assert lost == {jobs[2][1]}
    assert [sqlite_store.get(job_id).content for job_id, _ in jobs] == ["first", "", ""]  # type: ignore[union-attr]


def test_the_progress_writer_writes_every_tracked_job_and_raises_lost_on_a_cancelled_one(
    sqlite_store: JobStore,
) -> None:
    # Given two tracked attempts that streamed some text, one of them cancelled
    writer = ProgressWriter(sqlite_store, interval_s=60)
    (kept_id, kept_owner), (gone_id, gone_owner) = [(unique("job"), unique("owner")) for _ in range(2)]
    for job_id, owner in ((kept_id, kept_owner), (gone_id, gone_owner)):
        _claimed(sqlite_store, job_id, owner)
    kept, gone = writer.track(kept_id, kept_owner), writer.track(gone_id, gone_owner)
    kept.append("hello ")
    kept.append("world")
    gone.append("x")
    assert sqlite_store.cancel(gone_id, user_id="u1")
    # When the writer writes its batch
    writer.write([kept, gone])
    # Then the kept job's text is stored, and the cancelled one is told its lease is lost
    assert sqlite_store.get(kept_id).content == "hello world"  # type: ignore[union-attr]
    assert not kept.lost.is_set()
    assert gone.lost.is_set()


class _RecordingStore(JobStore):
    """A job store that notes when each batch of texts was written, and what it held."""

    text_writes: list[tuple[float, dict[str, str | None]]]

    def write_texts(self, beats: Sequence[Heartbeat]) -> None:
        super().write_texts(beats)
        self.text_writes.append((time.monotonic(), {beat.job_id: beat.content for beat in beats}))


def test_new_text_is_written_as_it_arrives_not_at_the_next_heartbeat(sqlite_store: JobStore) -> None:
    # Given a progress writer whose heartbeats are a minute apart, and a running job
    store = _RecordingStore(sqlite_store.engine)
    store.text_writes = []
    writer = ProgressWriter(store, interval_s=60, text_batch_s=0.05)
    job_id, owner = unique("job"), unique("owner")
    _claimed(store, job_id, owner)
    running = writer.track(job_id, owner)
    # When a piece of text arrives
    running.append("first")
    # Then it is stored long before the next heartbeat would carry it
    wait_until(lambda: store.get(job_id).content == "first", timeout=5, what="the text")  # type: ignore[union-attr]
    writer.untrack(running)


def test_pieces_of_one_job_are_coalesced_over_the_interval_and_all_jobs_due_are_written_together(
    sqlite_store: JobStore,
) -> None:
    # Given a progress writer writing each job's text at most every 0.4 s (heartbeats a minute apart), three jobs
    store = _RecordingStore(sqlite_store.engine)
    store.text_writes = []
    writer = ProgressWriter(store, interval_s=60, text_interval_s=0.4, text_batch_s=0.05, first_text_after_s=0)
    jobs = [(unique("job"), unique("owner")) for _ in range(3)]
    for job_id, owner in jobs:
        _claimed(store, job_id, owner)
    tracked = [writer.track(job_id, owner) for job_id, owner in jobs]
    # When each job streams a piece at once, and the first job more pieces right after
    for running in tracked:
        running.append("a")
    wait_until(lambda: store.text_writes, timeout=5, what="the first write")
    for piece in "bcd":
        tracked[0].append(piece)
    wait_until(
        lambda: store.get(jobs[0][0]).content == "abcd",  # type: ignore[union-attr]
        timeout=5,
        what="the later pieces",
    )
    for running in tracked:
        writer.untrack(running)
    # Then the three first pieces went in one write, and the later ones in one more, an interval after it
    (first_at, first), *later = [(at, texts) for at, texts in store.text_writes if texts]
    assert first == {job_id: "a" for job_id, _ in jobs}
    assert [texts for _, texts in later] == [{jobs[0][0]: "abcd"}]
    assert later[0][0] - first_at >= 0.4 - 0.01


def test_the_first_text_of_an_attempt_waits_a_moment_so_an_instant_answer_is_stored_with_its_outcome_alone(
    sqlite_store: JobStore,
) -> None:
    # Given an attempt whose first text is held for a minute, that has streamed a piece
    store = _RecordingStore(sqlite_store.engine)
    store.text_writes = []
    writer = ProgressWriter(store, interval_s=600, text_batch_s=0.01, first_text_after_s=60)
    held_job, held_owner = unique("job"), unique("owner")
    _claimed(store, held_job, held_owner)
    held = writer.track(held_job, held_owner)
    held.append("instant answer")
    # When an attempt started later with no hold streams a piece, and that piece is written
    writer.first_text_after_s = 0
    other_job, other_owner = unique("job"), unique("owner")
    _claimed(store, other_job, other_owner)
    writer.track(other_job, other_owner).append("other")
    wait_until(lambda: store.get(other_job).content == "other", timeout=5, what="the other attempt's text")  # type: ignore[union-attr]
    # Then the held attempt's piece was not written meanwhile: it ends before its hold, stored with its outcome
    assert [texts for _, texts in store.text_writes] == [{other_job: "other"}]
    writer.untrack(held, completed=True)
    assert store.complete(
        held_job, owner=held_owner, content="instant answer", response={}, provider="p", model="m", usage=None
    )
    writer.settled(held)


def _attempt_with_its_first_text_written(
    sqlite_store: JobStore, *, text_interval_s: float
) -> tuple[_RecordingStore, ProgressWriter, str, str, Running]:
    """A running attempt whose first text was just written, so that its next piece is due ``text_interval_s`` later."""
    store = _RecordingStore(sqlite_store.engine)
    store.text_writes = []
    writer = ProgressWriter(
        store, interval_s=600, text_interval_s=text_interval_s, text_batch_s=0.01, first_text_after_s=0
    )
    job_id, owner = unique("job"), unique("owner")
    _claimed(store, job_id, owner)
    running = writer.track(job_id, owner)
    running.append("first ")
    wait_until(lambda: store.get(job_id).content == "first ", timeout=5, what="the first text")  # type: ignore[union-attr]
    return store, writer, job_id, owner, running


def test_text_an_attempt_streamed_just_before_it_ended_is_written_when_due_though_its_outcome_is_slow(
    sqlite_store: JobStore,
) -> None:
    # Given a job whose text was just written, so that its next piece is due 0.3 s later
    store, writer, job_id, _, running = _attempt_with_its_first_text_written(sqlite_store, text_interval_s=0.3)
    # When its last piece arrives and the attempt completes, its outcome never written
    running.append("last")
    writer.untrack(running, completed=True)
    # Then the stored text gets the last piece all the same, when it falls due
    wait_until(lambda: store.get(job_id).content == "first last", timeout=5, what="the last piece")  # type: ignore[union-attr]
    (first_at, _), (last_at, _) = store.text_writes
    assert last_at - first_at >= 0.3 - 0.01


def test_an_ended_attempt_whose_outcome_was_written_in_time_gets_no_text_write_of_its_own(
    sqlite_store: JobStore,
) -> None:
    # Given an attempt that completed with a piece due 0.3 s after its last write, whose outcome was written at once
    store, writer, job_id, owner, running = _attempt_with_its_first_text_written(sqlite_store, text_interval_s=0.3)
    running.append("last")
    writer.untrack(running, completed=True)
    assert store.complete(job_id, owner=owner, content="first last", response={}, provider="p", model="m", usage=None)
    writer.settled(running)
    # When another attempt, started after it with its first text held for 1 s, streams a piece that is written
    writer.first_text_after_s = 1.0
    later_job, later_owner = unique("job"), unique("owner")
    _claimed(store, later_job, later_owner)
    later = writer.track(later_job, later_owner)
    later.append("late")
    wait_until(lambda: store.get(later_job).content == "late", timeout=5, what="the later attempt's text")  # type: ignore[union-attr]
    # Then the first attempt's last piece, due before it, was never written alone: it went with the outcome
    assert [texts for _, texts in store.text_writes] == [{job_id: "first "}, {later_job: "late"}]


def test_the_last_text_of_an_ended_attempt_never_overwrites_its_outcome(sqlite_store: JobStore) -> None:
    # Given an attempt whose outcome was written before its last streamed text
    store, writer, job_id, owner, running = _attempt_with_its_first_text_written(sqlite_store, text_interval_s=0.3)
    running.append("last")
    assert store.complete(job_id, owner=owner, content="answer", response={}, provider="p", model="m", usage=None)
    # When the attempt ends and its text is written
    writer.untrack(running, completed=True)
    wait_until(lambda: len(store.text_writes) == 2, timeout=5, what="the last text's write")
    # Then the outcome's content is kept
    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.content) == (JobStatus.COMPLETED, "answer")


def test_a_loops_clients_are_shared_one_after_another_and_spread_when_many_requests_run_at_once() -> None:
    # Given pooled clients of at most two requests in flight each
    built: list[object] = []

    async def close(client: object) -> None:
        return None

    def build() -> object:
        built.append(object())
        return built[-1]

    clients = LoopClients(build, close, requests_per_client=2)

    async def scenario() -> tuple[set[int], set[int]]:
        # When three requests run one after another, then five at once
        one_after_another = set()
        for _ in range(3):
            async with clients.lease() as client:
                one_after_another.add(id(client))
        release = asyncio.Event()
        at_once: set[int] = set()

        async def hold() -> None:
            async with clients.lease() as client:
                at_once.add(id(client))
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(5)]
        while len(at_once) < 3 and not all(task.done() for task in tasks):
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        await close_clients()
        return one_after_another, at_once

    one_after_another, at_once = asyncio.run(scenario())
    # Then the sequential requests shared one client, and the concurrent ones were spread over three
    assert len(one_after_another) == 1
    assert len(at_once) == 3
    assert len(built) == 3

"""Per-user throttling across real worker processes sharing one Redis."""

from __future__ import annotations

from collections import defaultdict

from actors import cancel_job, enqueue_generation, enqueue_preview, user_loads
from repositories.store import JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import RecordedRequest, Reply


def peak_overlap(requests: list[RecordedRequest]) -> int:
    """The most requests whose connections were open at the same moment."""
    events = []
    for request in requests:
        assert request.closed_at is not None
        events += [(request.received_at, 1), (request.closed_at, -1)]
    peak = current = 0
    for _, change in sorted(events, key=lambda event: (event[0], event[1])):
        current += change
        peak = max(peak, current)
    return peak


def test_the_limit_holds_across_two_worker_processes_and_costs_no_retry(stack: Stack) -> None:
    # Given two worker processes and a per-user limit of 2
    with stack.other_workers(2, "limit", GENERATE_USER_CONCURRENCY="2"):
        heavy, light = unique("heavy"), unique("light")
        jobs: dict[str, list[str]] = defaultdict(list)
        # When one user submits 8 slow jobs and another user one job
        for index in range(8):
            key = f"{heavy}-{index}"
            stack.server.script_for(key, Reply.ok(*["x"] * 4, chunk_delay_s=0.1))
            jobs[heavy].append(enqueue_generation(user_id=heavy, params=params(key), job_id=key))
        stack.server.script_for(light, Reply.ok("quick"))
        jobs[light].append(enqueue_generation(user_id=light, params=params(light), job_id=light))
        finished = [stack.wait_for_status(job_id, timeout=60) for job_ids in jobs.values() for job_id in job_ids]
    # Then every job completed on its first attempt, and never more than 2 of the user's ran at once
    assert all(job.status is JobStatus.COMPLETED and job.attempts == 1 for job in finished)
    heavy_requests = [r for r in stack.server.requests if heavy in r.last_message_text]
    assert len(heavy_requests) == 8
    assert peak_overlap(heavy_requests) == 2
    # And the light user's job did not wait for the heavy user's backlog
    light_request = stack.server.requests_for(light)[0]
    last_heavy_start = max(r.received_at for r in heavy_requests)
    assert light_request.received_at < last_heavy_start


def test_preview_and_generate_limits_are_independent(stack: Stack) -> None:
    with stack.other_workers(1, "independent", GENERATE_USER_CONCURRENCY="1", PREVIEW_USER_CONCURRENCY="1"):
        user = unique("user")
        # Given the user's only generate slot held by a stalled stream
        running = unique("job")
        stack.server.script_for(running, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=user, params=params(running), job_id=running)
        wait_until(lambda: stack.server.requests_for(running), timeout=15)
        # When the same user asks for a preview of long content
        preview = unique("preview")
        stack.server.script_for(preview, Reply.ok("a preview"))
        job_id = enqueue_preview(user_id=user, title="t", content=f"[[{preview}]] " + "long text " * 40)
        # Then the preview completes while the generation still holds its slot
        assert stack.wait_for_status(job_id, timeout=20).status is JobStatus.COMPLETED
        still = stack.store.get(running)
        assert still is not None
        assert still.status is JobStatus.PROCESSING
        assert cancel_job(running, user_id=user)


def test_a_killed_workers_slots_come_back_within_the_lease_while_the_user_keeps_submitting(stack: Stack) -> None:
    user = unique("user")
    stalled = unique("stalled")
    env = {"GENERATE_USER_CONCURRENCY": "1", "THROTTLE_LEASE_S": "3"}
    with stack.other_workers(1, "doomed-throttle", fresh_queues=False, **env) as (doomed,):
        # Given the user's only slot held by a job on a worker that is then killed
        stack.server.script_for(stalled, Reply.ok("a", stall_after_chunks=1), Reply.ok("second life"))
        enqueue_generation(user_id=user, params=params(stalled), job_id=stalled)
        wait_until(lambda: stack.server.requests_for(stalled), timeout=15)
        doomed.kill()
        survivor = stack.new_worker(f"survivor-{stack.backend}", **env).start()
        try:
            # When the user keeps submitting
            submitted = []
            for index in range(3):
                key = f"{user}-{index}"
                stack.server.script_for(key, Reply.ok("fine"))
                submitted.append(enqueue_generation(user_id=user, params=params(key), job_id=key))
            # Then the new jobs run once the dead worker's lease (3 s) has expired, and all complete
            for job_id in [*submitted, stalled]:
                assert stack.wait_for_status(job_id, timeout=45).status is JobStatus.COMPLETED
        finally:
            survivor.stop()
    first_new = stack.server.requests_for(f"{user}-0")[0]
    killed_at = stack.server.requests_for(stalled)[0].closed_at
    assert killed_at is not None
    assert first_new.received_at - killed_at < 3 + 2 + 5  # lease + sweep interval + a generous margin


def test_a_job_longer_than_the_lease_keeps_its_slot(stack: Stack) -> None:
    with stack.other_workers(1, "long-lease", GENERATE_USER_CONCURRENCY="1", THROTTLE_LEASE_S="2"):
        user = unique("user")
        long_job, next_job = unique("long"), unique("next")
        # Given a job streaming for about 5 s under a 2 s lease
        stack.server.script_for(long_job, Reply.ok(*["x"] * 20, chunk_delay_s=0.25))
        stack.server.script_for(next_job, Reply.ok("after"))
        enqueue_generation(user_id=user, params=params(long_job), job_id=long_job)
        wait_until(lambda: stack.server.requests_for(long_job), timeout=15)
        # When the same user submits another job
        enqueue_generation(user_id=user, params=params(next_job), job_id=next_job)
        assert stack.wait_for_status(next_job, timeout=30).status is JobStatus.COMPLETED
    # Then it started only after the long job had finished
    long_request = stack.server.requests_for(long_job)[0]
    assert long_request.closed_at is not None
    assert stack.server.requests_for(next_job)[0].received_at >= long_request.closed_at


def test_running_and_waiting_jobs_per_user_can_be_read_from_code(stack: Stack) -> None:
    with stack.other_workers(1, "visible", GENERATE_USER_CONCURRENCY="1"):
        user = unique("user")
        # Given one running job of the user and two more submitted
        keys = [f"{user}-{index}" for index in range(3)]
        stack.server.script_for(keys[0], Reply.ok("a", stall_after_chunks=1))
        for key in keys:
            stack.server.script_for(key, Reply.ok("done"))
            enqueue_generation(user_id=user, params=params(key), job_id=key)
        # When the loads are read / Then one runs and two wait
        load = wait_until(
            lambda: next((x for x in user_loads() if x.user_id == user and x.waiting == 2), None),
            timeout=15,
            what="two parked jobs",
        )
        assert (load.actor, load.running, load.waiting) == ("generate_llm_response", 1, 2)
        assert cancel_job(keys[0], user_id=user)
        for key in keys[1:]:
            assert stack.wait_for_status(key, timeout=20).status is JobStatus.COMPLETED
        # Then nothing of the user runs or waits any more (a slot is released just after its job's final write)
        wait_until(
            lambda: not [x for x in user_loads() if x.user_id == user],
            timeout=10,
            what="the user's last slot to be released",
        )


def test_a_job_sent_while_its_user_has_a_backlog_is_parked_by_the_sender_not_by_a_worker(stack: Stack) -> None:
    with stack.other_workers(1, "park-at-send", GENERATE_USER_CONCURRENCY="1") as (worker,):
        user = unique("user")
        running, first, later = unique("running"), unique("first"), [unique("later") for _ in range(3)]
        # Given the user's only slot held by a stalled stream, and one job parked by the worker
        stack.server.script_for(running, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=user, params=params(running), job_id=running)
        wait_until(lambda: stack.server.requests_for(running), timeout=15)
        stack.server.script_for(first, Reply.ok("first"))
        enqueue_generation(user_id=user, params=params(first), job_id=first)
        wait_until(lambda: any(x.user_id == user and x.waiting == 1 for x in user_loads()), timeout=15)
        # When three more jobs of the user are sent through the API
        for key in later:
            stack.server.script_for(key, Reply.ok("later"))
            enqueue_generation(user_id=user, params=params(key), job_id=key)
        # Then they wait behind the first without any worker receiving them
        assert [(x.running, x.waiting) for x in user_loads() if x.user_id == user] == [(1, 4)]
        assert cancel_job(running, user_id=user)
        finished = [stack.wait_for_status(key, timeout=20) for key in [first, *later]]
        log = worker.log()
    assert all(job.status is JobStatus.COMPLETED and job.attempts == 1 for job in finished)
    # in order, one at a time
    starts = [stack.server.requests_for(key)[0].received_at for key in [first, *later]]
    assert starts == sorted(starts)
    # and the worker parked only the first: the others reached it once, already holding their slot
    parked_by_worker = [line for line in log.splitlines() if "job parked" in line and f"user_id={user}" in line]
    assert len(parked_by_worker) == 1


def test_a_cancelled_waiting_job_leaves_the_line_at_once_and_never_reaches_the_provider(stack: Stack) -> None:
    with stack.other_workers(1, "cancel-parked", GENERATE_USER_CONCURRENCY="1"):
        user = unique("user")
        running, doomed, kept = unique("running"), unique("doomed"), unique("kept")
        # Given a running job of the user and two more waiting for its slot
        stack.server.script_for(running, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=user, params=params(running), job_id=running)
        wait_until(lambda: stack.server.requests_for(running), timeout=15)
        for key in (doomed, kept):
            stack.server.script_for(key, Reply.ok("done"))
            enqueue_generation(user_id=user, params=params(key), job_id=key)
        wait_until(lambda: any(x.user_id == user and x.waiting == 2 for x in user_loads()), timeout=15)
        # When the first waiting job is cancelled
        assert cancel_job(doomed, user_id=user)
        # Then it no longer counts as waiting
        assert [(x.running, x.waiting) for x in user_loads() if x.user_id == user] == [(1, 1)]
        # And when the slot frees, the next job runs and the cancelled one never reaches the provider
        assert cancel_job(running, user_id=user)
        assert stack.wait_for_status(kept, timeout=20).status is JobStatus.COMPLETED
        stack.wait_until_no_message_for(doomed)
    assert stack.server.requests_for(doomed) == []
    cancelled = stack.store.get(doomed)
    assert cancelled is not None
    assert cancelled.status is JobStatus.CANCELLED

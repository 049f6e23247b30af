"""Provider lanes across two real worker processes sharing one Redis, against a loopback provider with a quota."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import pytest

import actors
from actors import enqueue_generation
from actors.queue import JobQueue
from admission.lane_store import LaneStats, RedisLaneStore
from admission.lanes import Lane, LaneBook, estimate_prompt_tokens, parse_lanes
from repositories.store import JobStatus
from settings import Settings
from tests.conftest import TEST_API_KEY, unique
from tests.integration.conftest import PROJECT_ROOT, Stack, params, wait_until
from tests.integration.test_throttle import peak_overlap
from tests.loopback.anthropic import AnthropicServer
from tests.loopback.anthropic import Reply as AnthropicReply
from tests.loopback.openrouter import Reply
from tests.loopback.quota import QuotaServer

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


@pytest.fixture
def quota() -> Iterator[QuotaServer]:
    """A fresh quota server per test (generous by default: a test narrows what it needs)."""
    with QuotaServer(requests=1000, tokens=10_000_000, window_s=60) as server:
        yield server


def lanes_env(quota: QuotaServer, *lanes: Mapping[str, object], **extra: str) -> dict[str, str]:
    """Worker settings: the quota server as OpenRouter, and these lanes."""
    return {
        "OPENROUTER_BASE_URL": quota.base_url,
        "PROVIDER_LANES": json.dumps(list(lanes)),
        "GENERATE_USER_CONCURRENCY": "50",
        **extra,
    }


def the_lane(*lanes: Mapping[str, object]) -> Lane:
    """The lane the workers resolve for the test key (to read its stats from Redis)."""
    book = LaneBook(parse_lanes(json.dumps(list(lanes))), keys={"openrouter": TEST_API_KEY})
    return book.lanes[0]


def lane_stats(lane: Lane) -> LaneStats:
    """The lane as the workers left it in Redis."""
    return RedisLaneStore(actors.broker.client).stats(lane)


def test_after_a_429_the_whole_lane_pauses_for_its_retry_after_then_one_probe_goes_first(
    stack: Stack, quota: QuotaServer
) -> None:
    lane = {"provider": "openrouter"}
    with stack.other_workers(2, "lane-pause", fresh_queues=True, **lanes_env(quota, lane)):
        first, user = unique("first"), unique("user")
        # Given a request of the lane answered 429 with Retry-After: 5
        quota.script_for(first, Reply.error(429, retry_after="5"))
        enqueue_generation(user_id=user, params=params(first, max_tokens=4), job_id=first)
        (limited,) = quota.wait_for_requests(1, key=first, timeout=20)
        # (and its worker has recorded the pause: a request sent before that cannot have known of it)
        wait_until(
            lambda: lane_stats(the_lane(lane)).paused_until_ms > limited.received_at * 1000,
            timeout=10,
            what="the worker to record the lane's pause",
        )
        # When nine more jobs of the lane are sent to both workers
        others = [unique("later") for _ in range(9)]
        for index, key in enumerate(others):
            enqueue_generation(user_id=f"{user}-{index % 3}", params=params(key, max_tokens=4), job_id=key)
        # Then while the pause lasts each job says why it waits
        waiting = wait_until(
            lambda: (job := stack.store.get(others[-1])) is not None and job.error and job,
            timeout=10,
            what="the waiting reason",
        )
        assert waiting.status is JobStatus.PENDING
        assert waiting.error.startswith("waiting for openrouter: paused until ")
        assert waiting.error.endswith(" after a 429")
        jobs = [stack.wait_for_status(key, timeout=40) for key in [first, *others]]
    # And every job completed, none spent a retry, the 429'd one took a second attempt
    assert all(job.status is JobStatus.COMPLETED for job in jobs)
    assert [job.retries for job in jobs] == [0] * 10
    assert jobs[0].attempts == 2
    # And no request of the lane reached the server for 5 s (counted at the server)
    after = sorted((r for r in quota.requests if r.index != limited.index), key=lambda r: r.received_at)
    assert len(after) == 10
    assert after[0].received_at >= limited.received_at + 5.0
    # And the first one after the pause was alone: the others came only when it had succeeded
    probe = after[0]
    assert probe.closed_at is not None
    assert after[1].received_at >= probe.closed_at
    assert quota.rate_limited_count == 1


def test_the_limits_hold_across_two_worker_processes(stack: Stack, quota: QuotaServer) -> None:
    # Given a quota of 12 requests per 4 s, and a lane that matches it with at most 3 requests in flight
    quota.quota_requests, quota.window_s, quota.token_delay_s = 12, 4.0, 0.02
    lane = {"provider": "openrouter", "requests_per_minute": 12, "window_s": 4, "concurrent": 3}
    with stack.other_workers(2, "lane-limits", fresh_queues=True, **lanes_env(quota, lane)):
        user = unique("user")
        # When 30 jobs of 5 users are sent
        keys = [unique("job") for _ in range(30)]
        for index, key in enumerate(keys):
            enqueue_generation(user_id=f"{user}-{index % 5}", params=params(key, max_tokens=10), job_id=key)
        jobs = [stack.wait_for_status(key, timeout=60) for key in keys]
    # Then all completed without a 429, never more than 3 in flight, never more than 12 in any 4 s
    assert all(job.status is JobStatus.COMPLETED and job.retries == 0 for job in jobs)
    assert quota.rate_limited_count == 0
    requests = quota.requests
    assert peak_overlap(requests) <= 3
    starts = sorted(r.received_at for r in requests)
    assert max(sum(1 for t in starts if s <= t < s + 4.0) for s in starts) <= 12


def test_a_killed_workers_lane_slot_and_token_reservation_come_back_within_the_lease(
    stack: Stack, quota: QuotaServer
) -> None:
    # 1000 tokens per 30 s: the next job (115 tokens) fits only once the dead request's 895 came back
    lane = {"provider": "openrouter", "concurrent": 1, "tokens_per_minute": 1000, "window_s": 30}
    env = lanes_env(quota, lane, THROTTLE_LEASE_S="3")
    stalled, user = unique("stalled"), unique("user")
    with stack.other_workers(1, "lane-doomed", fresh_queues=True, **env) as (doomed,):
        # Given the lane's only slot and 895 reserved tokens held by a stream on a worker then SIGKILLed
        quota.script_for(stalled, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=user, params=params(stalled, max_tokens=880), job_id=stalled)
        quota.wait_for_requests(1, key=stalled, timeout=20)
        prompt = estimate_prompt_tokens([params(stalled)["messages"][0]["content"]])
        held = lane_stats(the_lane(lane))
        assert (held.slots, held.tokens) == (1, prompt + 880)
        doomed.kill()
        killed = time.time()
        # When its lease (3 s) has run out
        freed = wait_until(
            lambda: (stats := lane_stats(the_lane(lane))).slots == 0 and stats,
            timeout=10,
            what="the dead worker's lane slot to come back",
        )
        # Then its slot is free and only its prompt estimate stays counted
        assert time.time() - killed < 3 + 2
        assert freed.tokens == prompt
        survivor = stack.new_worker(f"lane-survivor-{stack.backend}", **env).start()
        try:
            # And another job of the lane runs at once, although the window has 25 s to go
            after = unique("after")
            enqueue_generation(user_id=unique("other"), params=params(after, max_tokens=100), job_id=after)
            assert stack.wait_for_status(after, timeout=20).status is JobStatus.COMPLETED
            assert time.time() - killed < 25
        finally:
            actors.cancel_job(stalled, user_id=user)
            survivor.stop()
    assert quota.rate_limited_count == 0


def test_inside_a_lane_waiting_jobs_are_admitted_round_robin_across_users(stack: Stack, quota: QuotaServer) -> None:
    quota.token_delay_s = 0.02
    lane = {"provider": "openrouter", "concurrent": 1}
    with stack.other_workers(2, "lane-fair", fresh_queues=True, **lanes_env(quota, lane)):
        heavy, light = unique("heavy"), unique("light")
        # Given a heavy user with 12 jobs waiting for a lane that runs one request at a time
        heavy_keys = [f"{heavy}-{index}" for index in range(12)]
        for key in heavy_keys:
            enqueue_generation(user_id=heavy, params=params(key, max_tokens=10), job_id=key)
        quota.wait_for_requests(1, timeout=20)
        # When a light user sends 2 jobs after them
        light_keys = [f"{light}-{index}" for index in range(2)]
        for key in light_keys:
            enqueue_generation(user_id=light, params=params(key, max_tokens=10), job_id=key)
        jobs = [stack.wait_for_status(key, timeout=60) for key in [*heavy_keys, *light_keys]]
    assert all(job.status is JobStatus.COMPLETED for job in jobs)
    # Then the light user's jobs are not served last: users alternate
    order = [r for r in sorted(quota.requests, key=lambda r: r.received_at)]
    positions = [index for index, r in enumerate(order) if light in r.last_message_text]
    assert len(positions) == 2
    assert positions[1] <= 7, positions  # behind a FIFO line they would be 12th and 13th


def test_a_job_waiting_longer_than_the_maximum_gives_up_with_a_clear_error(stack: Stack, quota: QuotaServer) -> None:
    lane = {"provider": "openrouter", "concurrent": 1}
    with stack.other_workers(1, "lane-give-up", fresh_queues=True, **lanes_env(quota, lane, LANE_MAX_WAIT_S="2")):
        blocker, waiter = unique("blocker"), unique("waiter")
        # Given the lane's only slot held by a stalled stream
        quota.script_for(blocker, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=unique("u"), params=params(blocker), job_id=blocker)
        quota.wait_for_requests(1, key=blocker, timeout=20)
        # When another job waits for the lane longer than LANE_MAX_WAIT_S
        enqueue_generation(user_id=unique("u"), params=params(waiter), job_id=waiter)
        job = stack.wait_for_status(waiter, timeout=20)
        actors.cancel_job(blocker, user_id=stack.store.get(blocker).user_id)  # type: ignore[union-attr]
    # Then it failed, saying why, and never reached the provider
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert job.error.startswith("gave up after waiting 2 s for openrouter")
    assert quota.requests_for(waiter) == []


def test_llm_jobs_stats_shows_each_lane(stack: Stack, quota: QuotaServer) -> None:
    lane = {"provider": "openrouter", "requests_per_minute": 100, "tokens_per_minute": 5000, "concurrent": 4}
    env = lanes_env(quota, lane)
    with stack.other_workers(1, "lane-stats", fresh_queues=True, **env):
        key = unique("job")
        enqueue_generation(user_id=unique("u"), params=params(key, max_tokens=20), job_id=key)
        assert stack.wait_for_status(key, timeout=20).status is JobStatus.COMPLETED
        shown = subprocess.run(
            [sys.executable, "-m", "actors.cli", "stats"],
            cwd=PROJECT_ROOT,
            env={**stack.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    (row,) = [line for line in shown.splitlines() if line.strip().startswith("openrouter key ")]
    assert "1/100" in row  # one request in the current window
    assert "/4" in row
    assert TEST_API_KEY not in shown


def test_with_claude_agent_sdk_whose_cli_hides_retry_after_the_lane_pauses_for_its_default(stack: Stack) -> None:
    lane = {"provider": "claude-agent-sdk"}  # the default pause without Retry-After: 5 s
    with AnthropicServer() as anthropic:
        env = {
            "LLM_PROVIDER": "claude-agent-sdk",
            "ANTHROPIC_API_KEY": "sk-ant-test-" + "LANESNEVERLOGGED",
            "ANTHROPIC_BASE_URL": anthropic.base_url,
            "PROVIDER_LANES": json.dumps([lane]),
        }
        with stack.other_workers(2, "lane-agent", fresh_queues=True, **env):
            first, second, user = unique("first"), unique("second"), unique("user")
            # Given the CLI meets a 429 whose Retry-After (1 s) it does not pass on
            anthropic.script_for(first, AnthropicReply.error(429, retry_after="1"))
            enqueue_generation(user_id=user, params=params(first), job_id=first)
            (limited,) = anthropic.wait_for_requests(1, key=first, timeout=30)
            wait_until(
                lambda: (job := stack.store.get(first)) is not None and (job.error or "").startswith("waiting for"),
                timeout=20,
                what="the worker to learn of the 429 from the CLI",
            )
            # When another job of the lane is sent while the lane is paused
            enqueue_generation(user_id=user, params=params(second), job_id=second)
            jobs = [stack.wait_for_status(key, timeout=60) for key in (first, second)]
    # Then both completed without a retry spent, and nothing reached the API for the default 5 s
    assert [(job.status, job.retries) for job in jobs] == [(JobStatus.COMPLETED, 0)] * 2
    later = [r for r in anthropic.requests if r.index != limited.index]
    assert len(later) == 2
    assert min(r.received_at for r in later) >= limited.received_at + 5.0


def test_a_job_waiting_in_a_lane_line_has_a_live_path_so_the_reconciler_does_not_send_it_again(
    stack: Stack, quota: QuotaServer
) -> None:
    lane = {"provider": "openrouter", "concurrent": 1}
    # A scheduler configured with the same lanes as the workers
    scheduler = JobQueue(Settings(database_url=stack.database_url, provider_lanes=json.dumps([lane])))
    with (
        contextlib.closing(scheduler),
        stack.other_workers(1, "lane-reconcile", fresh_queues=True, **lanes_env(quota, lane)),
        scheduler.bound(),
    ):
        blocker, waiter = unique("blocker"), unique("waiter")
        # Given the lane's only slot held by a stalled stream
        quota.script_for(blocker, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=unique("u"), params=params(blocker), job_id=blocker)
        quota.wait_for_requests(1, key=blocker, timeout=20)
        # And another job parked in the lane's line (its message acked: it is nowhere in Dramatiq's queues)
        enqueue_generation(user_id=unique("u"), params=params(waiter), job_id=waiter)
        parked = wait_until(
            lambda: (job := stack.store.get(waiter)) is not None and (job.error or "").startswith("waiting") and job,
            timeout=20,
            what="the job to wait for its lane",
        )
        assert parked.status is JobStatus.PENDING
        assert lane_stats(the_lane(lane)).waiting == 1
        # When it has waited there longer than the reconciler's pending bound, and the reconciler sweeps
        time.sleep(1.5)
        reconciler = scheduler.reconciler(pending_after_s=1.0)
        stuck = reconciler.stuck()
        reconciler.sweep()
        # Then it is not stuck, and it was not sent again
        assert waiter not in {job.job_id for job in stuck.pending}
        unchanged = stack.store.get(waiter)
        assert unchanged is not None
        assert unchanged.enqueued_at == parked.enqueued_at
        assert lane_stats(the_lane(lane)).waiting == 1
        # And once the slot frees, it completes exactly once
        assert actors.cancel_job(blocker, user_id=stack.store.get(blocker).user_id)  # type: ignore[union-attr]
        job = stack.wait_for_status(waiter, timeout=30)
        stack.wait_until_no_message_for(waiter, timeout=10)
    assert (job.status, job.attempts, job.retries) == (JobStatus.COMPLETED, 1, 0)
    assert len(quota.requests_for(waiter)) == 1

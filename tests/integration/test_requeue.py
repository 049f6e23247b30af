"""The reconciler through the operator CLI: ``llm-jobs requeue JOB_ID|--stuck`` and the stuck count in ``stats``."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import update

from actors import cancel_job, enqueue_generation
from actors.cli import main
from repositories.store import Job, JobKind, JobRow, JobStatus, utcnow
from tests.conftest import unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import Reply


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``llm-jobs argv`` in this process; its exit status, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lost_pending_job(stack: Stack, key: str) -> str:
    """A pending job whose message was sent two minutes ago and then lost (Redis restarted empty, say)."""
    two_minutes_ago = utcnow() - timedelta(minutes=2)
    stack.store.create(
        job_id=key, user_id="u-lost", kind=JobKind.GENERATE, request=params(key), now=two_minutes_ago, enqueued=True
    )
    return key


def lost_processing_job(stack: Stack, key: str, *, retries: int = 0) -> str:
    """A processing job whose worker died and whose message was dead-lettered: a heartbeat two minutes old."""
    stack.store.create(job_id=key, user_id="u-lost", kind=JobKind.GENERATE, request=params(key), enqueued=True)
    assert stack.store.claim(key, owner="dead-token", message_id="dead-message", lease_s=30) is not None
    with stack.store.engine.begin() as connection:
        connection.execute(
            update(JobRow)
            .where(JobRow.job_id == key)
            .values(heartbeat_at=utcnow() - timedelta(minutes=2), updated_at=utcnow() - timedelta(minutes=2))
            .values(retries=retries)
        )
    return key


def test_requeue_sends_a_pending_job_whose_message_was_lost_back_to_work(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a pending job with no message anywhere in the broker
    key = lost_pending_job(stack, unique("lost"))
    stack.server.script_for(key, Reply.ok("found ", "again"))
    # When an operator requeues it
    code, out, err = run(capsys, "requeue", key)
    # Then it runs once and completes
    assert (code, out, err) == (0, f"requeued {key}\n", "")
    job = stack.wait_for_status(key)
    assert job.status is JobStatus.COMPLETED
    assert job.content == "found again"
    assert len(stack.server.requests_for(key)) == 1


def test_requeue_stuck_takes_a_dead_attempt_back_without_spending_a_retry(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a processing job whose attempt is gone, with one provider retry already spent
    key = lost_processing_job(stack, unique("dead"), retries=1)
    stack.server.script_for(key, Reply.error(503), Reply.error(503), Reply.ok("third ", "time"))
    # When an operator requeues every stuck job
    code, out, _ = run(capsys, "requeue", "--stuck")
    # Then this one is among them, goes back to work, and keeps its remaining two retries (of three)
    assert code == 0
    count = re.fullmatch(r"requeued (\d+) stuck jobs\n", out)
    assert count is not None, out
    assert int(count.group(1)) >= 1
    job = stack.wait_for_status(key, timeout=30)
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "third time"
    assert job.retries == 3
    assert len(stack.server.requests_for(key)) == 3


def test_requeue_refuses_a_job_that_is_running(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a job streaming on the worker (its heartbeat is fresh)
    key = unique("busy")
    stack.server.script_for(key, Reply.ok("slow", stall_after_chunks=1))
    enqueue_generation(user_id="u-busy", params=params(key), job_id=key)
    wait_until(lambda: _streaming(stack.store.get(key)), timeout=15, what="the job to stream")
    # When an operator tries to requeue it
    code, out, err = run(capsys, "requeue", key)
    # Then nothing is sent: it is not stuck
    assert (code, out) == (1, "")
    assert "is running" in err
    assert "not stuck" in err
    assert len(stack.server.requests_for(key)) == 1
    assert cancel_job(key, user_id="u-busy")


def test_requeue_refuses_a_finished_job(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    key = unique("done")
    stack.store.create(job_id=key, user_id="u-done", kind=JobKind.GENERATE, request=params(key))
    assert stack.store.cancel(key, user_id="u-done")
    code, _, err = run(capsys, "requeue", key)
    assert code == 1
    assert "already cancelled" in err


def test_stats_counts_the_stuck_jobs(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a lost pending job and a processing job whose attempt is gone
    lost_pending_job(stack, unique("stuck"))
    lost_processing_job(stack, unique("stuck"))
    # When an operator asks for the stats
    code, out, _ = run(capsys, "stats")
    # Then both are counted as stuck
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("stuck jobs:"))
    counts = re.match(r"stuck jobs: (\d+) \((\d+) processing .*, (\d+) pending ", line)
    assert counts is not None, line
    total, processing, pending = (int(value) for value in counts.groups())
    assert processing >= 1
    assert pending >= 1
    assert total == processing + pending
    run(capsys, "requeue", "--stuck")


def _streaming(job: Job | None) -> bool:
    return job is not None and job.status is JobStatus.PROCESSING and job.content != ""

"""Worker logs: every job line carries its ids; LOG_FORMAT=json writes one object per line."""

from __future__ import annotations

import json

from actors import enqueue_generation
from repositories.store import JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import Reply


def test_json_logs_carry_the_job_ids_on_every_job_line(stack: Stack) -> None:
    with stack.other_workers(1, "json-logs", LOG_FORMAT="json") as (worker,):
        key = unique("job")
        stack.server.script_for(key, Reply.error(503), Reply.ok("fine"))
        assert stack.wait_for_status(enqueue_generation(user_id="u7", params=params(key), job_id=key)).status is (
            JobStatus.COMPLETED
        )
        # The row is final a moment before the worker logs its last line about it: wait for that line.
        log = wait_until(
            lambda: worker.log() if "attempt finished" in worker.log() else None,
            timeout=10,
            what="the attempt-finished line",
        )
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [record for record in records if record.get("job_id") == key]
    messages = [record["message"] for record in mine]
    assert any(message.startswith("attempt 1 started") for message in messages)
    assert any(message.startswith("attempt 2 failed") or "retrying" in message for message in messages)
    assert any(message.startswith("attempt finished") for message in messages)
    for record in mine:
        assert record["user_id"] == "u7"
    started = [record for record in mine if record["message"].startswith("attempt")]
    assert {record["provider"] for record in started} == {"openrouter"}
    assert {record["kind"] for record in started} == {"generate"}


def test_text_logs_show_the_ids_after_the_message(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("fine"))
    stack.wait_for_status(enqueue_generation(user_id="u8", params=params(key), job_id=key))
    lines = [line for line in stack.worker.log().splitlines() if f"job_id={key}" in line]
    assert any("attempt finished" in line and "user_id=u8" in line and "kind=generate" in line for line in lines)


def test_log_level_warning_keeps_the_workers_info_lines_out(stack: Stack) -> None:
    # Given a worker started with LOG_LEVEL=WARNING
    with stack.other_workers(1, "quiet-logs", LOG_LEVEL="WARNING") as (worker,):
        key = unique("job")
        stack.server.script_for(key, Reply.error(503), Reply.ok("fine"))
        # When a job fails once and then completes
        job = stack.wait_for_status(enqueue_generation(user_id="u9", params=params(key), job_id=key))
        assert job.status is JobStatus.COMPLETED
        # Then the retry's warning is logged, and none of the job's INFO lines
        log = wait_until(
            lambda: worker.log() if f"job_id={key}" in worker.log() else None, timeout=10, what="the retry warning"
        )
    lines = [line for line in log.splitlines() if f"job_id={key}" in line]
    assert any("[WARNING]" in line and "retrying" in line for line in lines)
    assert not any("[INFO]" in line for line in lines)
    assert "attempt finished" not in log

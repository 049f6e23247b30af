"""The scheduler process: a cron trigger from CLEANUP_CRON that sends cleanup_old_jobs, stopping cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import actors
from scheduler import build_scheduler, send_cleanup
from tests.integration.conftest import PROJECT_ROOT, WorkerSlot, wait_until


def test_the_trigger_follows_the_crontab_expression() -> None:
    scheduler = build_scheduler("0 2 * * *")
    job = scheduler.get_job("cleanup_old_jobs")
    assert job is not None
    upcoming = job.trigger.get_next_fire_time(None, datetime(2026, 11, 28, 15, 0, tzinfo=UTC))
    assert upcoming == datetime(2026, 11, 29, 2, 0, tzinfo=UTC)


def test_the_scheduler_also_sweeps_unsent_jobs_every_minute() -> None:
    job = build_scheduler("0 2 * * *").get_job("resend_unsent")
    assert job is not None
    assert job.trigger.interval.total_seconds() == 60


def test_the_scheduled_job_enqueues_the_cleanup_message(worker_slot: WorkerSlot) -> None:
    # Given an empty control queue, and no worker of another test to consume from it
    with worker_slot.exclusive():
        actors.broker.flush("llm_control")
        # When the scheduled function fires
        send_cleanup()
        # Then one cleanup_old_jobs message waits in Redis
        bodies = actors.broker.client.hvals("dramatiq:llm_control.msgs")
        assert sum(b"cleanup_old_jobs" in body for body in bodies) == 1
        actors.broker.flush("llm_control")


def test_the_scheduler_logs_its_next_run_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "scheduler.log"
    env = {**os.environ, "CLEANUP_CRON": "30 3 * * *", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "scheduler.py"], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: "next cleanup at" in log_path.read_text(), timeout=30, what="the next-run log line")
        assert "T03:30:00" in log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "scheduler stopped" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_sigterm_the_moment_the_scheduler_starts_still_stops_it_cleanly() -> None:
    # A stop signal can land while the scheduler is still starting (a deploy that restarts at once).
    for _attempt in range(5):
        # Given a scheduler process whose start-up log line has just been printed
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "scheduler.py"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        try:
            output = b""
            while b"next cleanup at" not in output:
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, output.decode(errors="replace")
                output += chunk
            # When SIGTERM arrives at once
            process.send_signal(signal.SIGTERM)
            # Then it exits 0 within seconds, saying it stopped
            rest, _ = process.communicate(timeout=10)
            assert process.returncode == 0, (output + rest).decode(errors="replace")
            assert b"scheduler stopped" in output + rest
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_an_invalid_cron_stops_the_scheduler_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "CLEANUP_CRON": "every night"}
    result = subprocess.run(
        [sys.executable, "scheduler.py"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "CLEANUP_CRON" in result.stderr

"""Input the stores cannot hold, requests over the size limit, other users' job ids, and SQL errors that
must not carry their parameters: on SQLite and on PostgreSQL, through the web API and the store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import text, update
from sqlalchemy.exc import SQLAlchemyError

import actors
from actors.jobs import InvalidPayload
from actors.queue import JobQueue
from repositories.store import JobKind, JobRow, JobStore
from repositories.store import utcnow as store_now
from settings import Settings
from tests.conftest import database_url_for, unique
from tests.harness import PROJECT_ROOT
from tests.queues import queue_on

SECRET_TEXT = "generated text that must stay out of logs"


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest) -> Iterator[JobQueue]:
    """The web API on a migrated store of each backend (cancel signals off: nothing runs the jobs)."""
    settings = Settings(database_url=database_url_for(request, request.param), cancel_signals=False)
    with queue_on(settings) as current:
        yield current


def _params(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "test/model", "messages": [{"role": "user", "content": content}], **extra}


def _fields(error: ValidationError) -> set[str]:
    return {".".join(str(part) for part in item["loc"]) for item in error.errors()}


def test_the_store_reports_a_new_row_as_created_on_both_backends(store: JobStore) -> None:
    job_id = unique("created")
    assert store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={}) is True
    assert store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={}) is False


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: actors.enqueue_generation("a\x00b", _params()), "user_id"),
        (lambda: actors.enqueue_generation("u1", _params("a\x00b")), "params.messages.0.content"),
        (lambda: actors.enqueue_generation("u1", _params("lone \ud800 surrogate")), "params.messages.0.content"),
        (lambda: actors.enqueue_generation("u1", {**_params(), "model": "m\x00"}), "params.model"),
        (lambda: actors.enqueue_preview("u1", title="t\x00", content="c"), "title"),
        (lambda: actors.enqueue_preview("u1", title="t", content="c\x00"), "content"),
        (lambda: actors.cancel_job("a\x00b", user_id="u1"), "job_id"),
    ],
)
def test_characters_the_stores_cannot_hold_are_refused_naming_the_field(api: JobQueue, call: Any, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        call()
    assert field in _fields(raised.value)
    assert "\x00" not in str(raised.value)


def test_get_job_of_an_id_no_job_can_have_is_none(api: JobQueue) -> None:
    assert actors.get_job("a\x00b") is None
    assert actors.get_job("a\x00b", user_id="u1") is None
    assert actors.get_job(unique("job"), user_id="u\x00") is None


def test_a_request_over_the_size_limit_is_refused_naming_params(api: JobQueue) -> None:
    # 3 messages of 1 MB each: every message is within its own limit, the request is not
    params = {"model": "test/model", "messages": [{"role": "user", "content": "x" * 1_000_000}] * 3}
    job_id = unique("big")
    with pytest.raises(ValidationError) as raised:
        actors.enqueue_generation("u1", params, job_id=job_id)
    assert _fields(raised.value) == {"params"}
    assert "MAX_REQUEST_BYTES" in str(raised.value)
    assert api.store.get(job_id) is None
    with pytest.raises(ValidationError) as preview:
        actors.enqueue_preview("u1", title="t" * 1000, content="é" * 500_000 + "\U0001f600" * 300_000)
    assert _fields(preview.value) == {"content"}


def test_the_size_limit_is_the_setting(request: pytest.FixtureRequest) -> None:
    settings = Settings(database_url=database_url_for(request, "sqlite"), cancel_signals=False, max_request_bytes=2048)
    with queue_on(settings), pytest.raises(ValidationError, match="above the limit of 2048"):
        actors.enqueue_generation("u1", _params("y" * 3000))


def test_another_users_job_id_gets_the_answer_an_unknown_id_gets(api: JobQueue) -> None:
    # Given a job of u1
    job_id = actors.enqueue_generation("u1", _params(), job_id=unique("mine"))
    # When u2 enqueues, cancels or reads that id
    again = actors.enqueue_generation("u2", _params(), job_id=job_id)
    # Then u2 learns nothing: the same answers as for ids nobody uses, and u1's job is untouched
    assert again == job_id
    assert actors.cancel_job(job_id, user_id="u2") is False
    assert actors.get_job(job_id, user_id="u2") is None
    job = api.store.get(job_id)
    assert job is not None
    assert job.user_id == "u1"
    assert job.status != "cancelled"  # a worker may have started it meanwhile


def test_llm_jobs_cancel_says_the_same_for_another_users_job_as_for_an_unknown_one(
    api: JobQueue, request: pytest.FixtureRequest
) -> None:
    job_id = actors.enqueue_generation("u1", _params(), job_id=unique("theirs"))
    unknown = unique("unknown")
    env = {"DATABASE_URL": str(api.store.engine.url.render_as_string(hide_password=False)), "CANCEL_SIGNALS": "false"}

    def cancel(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "actors.cli", "cancel", target, "--user", "u2"],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    theirs, nobodys = cancel(job_id), cancel(unknown)
    assert theirs.returncode == nobodys.returncode == 1
    assert theirs.stderr.replace(job_id, "ID") == nobodys.stderr.replace(unknown, "ID")
    assert "another user" not in theirs.stderr


def test_cleanup_refuses_a_retention_below_one_day_and_deletes_nothing(api: JobQueue) -> None:
    job_id = unique("old")
    api.store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    api.store.fail(job_id, error="long ago")
    with api.store.engine.begin() as connection:
        connection.execute(
            update(JobRow).where(JobRow.job_id == job_id).values(updated_at=store_now() - timedelta(hours=1))
        )
    for days in (0, -1, "abc", 1.5, True):
        with pytest.raises(InvalidPayload, match="retention_days"):
            actors.cleanup_old_jobs.fn(retention_days=days)
    assert api.store.get(job_id) is not None


def test_sql_errors_never_carry_their_parameters(store: JobStore) -> None:
    with pytest.raises(SQLAlchemyError) as raised, store.engine.connect() as connection:
        connection.execute(text("SELECT * FROM no_such_table WHERE content = :content"), {"content": SECRET_TEXT})
    assert SECRET_TEXT not in str(raised.value)

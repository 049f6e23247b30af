"""Bad input: the web API refuses it before writing anything; a raw invalid message fails its job only."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from actors import enqueue_generation, enqueue_preview, generate_llm_response, generate_preview, get_job
from repositories.store import JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params
from tests.loopback.openrouter import Reply


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"params": {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}}, "params.messages.0.role"),
        ({"params": {"model": "m"}}, "params.messages"),
        ({"job_id": "not valid!"}, "job_id"),
    ],
)
def test_the_api_refuses_invalid_input_and_writes_nothing(stack: Stack, bad: dict[str, Any], field: str) -> None:
    job_id = unique("job")
    arguments: dict[str, Any] = {"user_id": "u1", "params": params(job_id), "job_id": job_id, **bad}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as caught:
        enqueue_generation(**arguments)
    assert isinstance(caught.value, ValidationError)
    assert get_job(job_id) is None
    assert stack.store.get(str(arguments["job_id"])) is None


def test_the_preview_api_names_the_bad_field(stack: Stack) -> None:
    with pytest.raises(ValueError, match="content"):
        enqueue_preview(user_id="u1", title="t", content=None)  # type: ignore[arg-type]


def test_a_job_id_of_another_user_is_ignored_like_a_duplicate(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("x"))
    enqueue_generation(user_id="u1", params=params(key), job_id=key)
    # An error here would tell u2 that the id exists; the enqueue is ignored as a duplicate would be.
    assert enqueue_generation(user_id="u2", params=params(key), job_id=key) == key
    assert get_job(key, user_id="u2") is None
    job = stack.wait_for_status(key)
    assert job.user_id == "u1"
    assert job.status is JobStatus.COMPLETED


def test_a_raw_invalid_message_fails_its_job_without_retry_and_the_worker_goes_on(stack: Stack) -> None:
    # Given a message sent by hand with an invalid role
    bad_id = unique("bad")
    generate_llm_response.send(
        job_id=bad_id, user_id="u1", params={"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}
    )
    # When the worker receives it
    job = stack.wait_for_status(bad_id)
    # Then the job is failed with the validation error, and no provider call was made
    assert job.status is JobStatus.FAILED
    assert job.attempts == 0
    assert job.error is not None
    assert "params.messages.0.role" in job.error
    assert stack.server.requests_for(bad_id) == []
    # And the worker goes on with the next message
    key = unique("job")
    stack.server.script_for(key, Reply.ok("still working"))
    assert stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key))).status is JobStatus.COMPLETED


def test_a_raw_message_with_unknown_or_missing_fields_is_failed_not_retried(stack: Stack) -> None:
    bad_id = unique("bad")
    generate_preview.send(job_id=bad_id, user_id="u1", title="t", content="c", colour="blue")
    job = stack.wait_for_status(bad_id)
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert "colour" in job.error
    # a message without a usable job id cannot be recorded, but must not break the worker
    generate_llm_response.send(user_id="u1")
    key = unique("job")
    stack.server.script_for(key, Reply.ok("fine"))
    assert stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key))).status is JobStatus.COMPLETED


def test_a_raw_invalid_message_never_touches_another_users_job(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("mine"))
    stack.wait_for_status(enqueue_generation(user_id="owner", params=params(key), job_id=key))
    generate_llm_response.send(job_id=key, user_id="intruder", params={"model": ""})
    probe = unique("probe")
    stack.server.script_for(probe, Reply.ok("after"))
    stack.wait_for_status(enqueue_generation(user_id="u1", params=params(probe)))
    job = stack.store.get(key)
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert job.content == "mine"

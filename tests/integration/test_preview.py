"""Tile previews: short content is kept without a model call; long content is summarised by the preview model."""

from __future__ import annotations

from actors import enqueue_preview, generate_preview
from repositories.store import JobKind, JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack
from tests.loopback.openrouter import Reply


def test_short_content_is_its_own_preview_and_calls_no_model(stack: Stack) -> None:
    # Given content of exactly 250 characters
    key = unique("preview")
    content = (f"[[{key}]] " + "x" * 250)[:250]
    # When a preview is requested
    job = stack.wait_for_status(enqueue_preview(user_id="u1", title="Short", content=content, job_id=key))
    # Then it is the content itself, and no request reached the provider
    assert job.status is JobStatus.COMPLETED
    assert job.kind is JobKind.PREVIEW
    assert job.response == {"preview": content, "used_ai": False}
    assert job.attempts == 0
    assert stack.server.requests_for(key) == []


def test_long_content_is_summarised_by_the_preview_model_and_trimmed(stack: Stack) -> None:
    # Given a model that answers with more than 250 characters
    key = unique("preview")
    stack.server.script_for(key, Reply.ok("A summary that runs on. " * 20))
    content = f"[[{key}]] " + "A long article. " * 40
    # When a preview is requested
    job = stack.wait_for_status(enqueue_preview(user_id="u1", title="Long", content=content, job_id=key))
    # Then the preview model was called with the preview settings and the answer is trimmed to 250
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.response is not None
    assert job.response["used_ai"] is True
    assert len(job.response["preview"]) <= 250
    assert job.response["preview"].startswith("A summary that runs on.")
    request = stack.server.requests_for(key)[0]
    assert request.body["model"] == stack.env.get("PREVIEW_MODEL", "openai/gpt-4o-mini")
    assert request.body["temperature"] == 0.3
    assert request.body["max_tokens"] == 100
    assert "Long" in request.body["messages"][-1]["content"]


def test_a_preview_sent_by_web_code_directly_creates_its_row(stack: Stack) -> None:
    key = unique("preview")
    generate_preview.send(job_id=key, user_id="u2", title="t", content="short")
    job = stack.wait_for_status(key)
    assert job.status is JobStatus.COMPLETED
    assert job.response == {"preview": "short", "used_ai": False}

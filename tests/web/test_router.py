"""The router without a worker: identity, bodies rejected with 422 naming the field, tokens, the dev identity."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from settings import ConfigurationError, Settings
from tests.queues import queue_on
from tests.web.support import header_user
from web import StreamTokens, build_router, create_app

USER = {"X-User-Id": "u1"}
GOOD_PARAMS = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(build_router(header_user, tokens=StreamTokens(b"k" * 32), redis_url=""))
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "params"),
        ({"params": {"messages": GOOD_PARAMS["messages"]}}, "model"),
        ({"params": {**GOOD_PARAMS, "messages": [{"role": "robot", "content": "hi"}]}}, "role"),
        ({"params": {**GOOD_PARAMS, "temperature": 9}}, "temperature"),
        ({"params": {**GOOD_PARAMS, "messages": [{"role": "user", "content": "a\x00b"}]}}, "messages.0.content"),
        ({"params": GOOD_PARAMS, "job_id": "bad id with spaces"}, "job_id"),
        ({"params": GOOD_PARAMS, "extra": 1}, "extra"),
    ],
)
def test_an_invalid_generation_body_answers_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/jobs", json=body, headers=USER)
    assert response.status_code == 422
    named = [".".join(map(str, item["loc"])) + " " + item["msg"] for item in response.json()["detail"]]
    assert any(field in text for text in named), named


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"content": "c"}, "title"),
        ({"title": "t\x00", "content": "c"}, "title"),
        ({"title": "t", "content": "\x00"}, "content"),
        ({"title": "t", "content": "c" * 500_001}, "content"),
    ],
)
def test_an_invalid_preview_body_answers_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/previews", json=body, headers=USER)
    assert response.status_code == 422
    assert any(field in item["loc"] for item in response.json()["detail"])


def test_a_body_that_is_not_json_answers_422_and_undecodable_bytes_400(client: TestClient) -> None:
    headers = {**USER, "Content-Type": "application/json"}
    assert client.post("/jobs", content=b"not json", headers=headers).status_code == 422
    assert client.post("/jobs", content=b"\x00not json", headers=headers).status_code == 400


def test_an_unknown_status_filter_answers_422_naming_status(client: TestClient) -> None:
    response = client.get("/jobs", params={"status": "lost"}, headers=USER)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "status"]


def test_a_request_without_identity_answers_401(client: TestClient) -> None:
    assert client.get("/jobs").status_code == 401
    assert client.post("/jobs", json={"params": GOOD_PARAMS}).status_code == 401


def test_an_id_that_cannot_be_a_job_is_not_found(client: TestClient) -> None:
    assert client.get("/jobs/a%00b", headers=USER).status_code == 404
    assert client.get("/jobs/" + "x" * 200, headers=USER).status_code == 404


def test_a_forged_or_expired_stream_token_answers_401(client: TestClient) -> None:
    tokens = StreamTokens(b"k" * 32, ttl_s=600)
    expired = StreamTokens(b"k" * 32, ttl_s=-1).issue("job-1", "u1")
    forged = StreamTokens(b"other-key-of-32-bytes-xxxxxxxxxx").issue("job-1", "u1")
    assert tokens.user_of(tokens.issue("job-1", "u1"), "job-1") == "u1"
    for token in (expired, forged, "garbage"):
        assert client.get("/jobs/job-1/events", params={"token": token}).status_code == 401


def test_a_stream_token_is_bound_to_its_job_and_expiry() -> None:
    tokens = StreamTokens(b"s" * 32, ttl_s=60)
    token = tokens.issue("job-1", "user.with.dots", now=1000)
    assert tokens.user_of(token, "job-1", now=1059) == "user.with.dots"
    assert tokens.user_of(token, "job-2", now=1000) is None
    assert tokens.user_of(token, "job-1", now=1061) is None
    assert tokens.user_of(token.replace("dXNlc", "dXNlZ"), "job-1", now=1000) is None


def test_a_short_stream_secret_is_rejected() -> None:
    with pytest.raises(ValueError, match="WEB_STREAM_SECRET"):
        StreamTokens(b"short")


def test_the_app_needs_an_identity_unless_the_dev_identity_is_on() -> None:
    with queue_on(Settings(web_dev_identity=False)), pytest.raises(ConfigurationError, match="WEB_DEV_IDENTITY"):
        create_app()


def test_the_dev_identity_takes_the_header_and_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with queue_on(Settings(web_dev_identity=True)), caplog.at_level(logging.WARNING, logger="web.app"):
        app = create_app(redis_url="")
    assert "WEB_DEV_IDENTITY is on" in caplog.text
    with TestClient(app) as client:
        assert client.get("/jobs").status_code == 401
        assert client.get("/operator").status_code == 200
        assert "streamJob" in client.get("/static/client.js").text
        assert client.get("/static/..%2Fapi.py").status_code == 404

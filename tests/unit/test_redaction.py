"""One place masks secrets: provider errors, every log line (message and traceback), stored tracebacks."""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from actors import log_redaction
from middleware.bad_messages import RedactTracebacks
from middleware.log_format import JsonFormatter
from repositories.errors import Unavailable, error_for_status
from repositories.redaction import REDACTED, redact, redacted_url, register_secret

CONFIGURED = "cfg" + uuid.uuid4().hex


@pytest.fixture(autouse=True)
def _configured_secret() -> None:
    register_secret(CONFIGURED)


@pytest.mark.parametrize(
    "secret",
    [
        CONFIGURED,
        "sk-" + "a1B2" * 12,
        "sk-ant-api03-" + "x9" * 20,
        "sk-or-v1-" + "0f" * 32,
    ],
)
def test_configured_and_key_shaped_secrets_are_masked(secret: str) -> None:
    text = f"Incorrect API key provided: {secret}. Check it."
    assert redact(text) == f"Incorrect API key provided: {REDACTED}. Check it."


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("Authorization: Bearer abcdef123456789", "abcdef123456789"),
        ('{"x-api-key": "zz99zz99zz99"}', "zz99zz99zz99"),
        ("api_key=hunter2hunter2&model=x", "hunter2hunter2"),
        ("postgresql://app:s3cretpw@db:5432/jobs", "s3cretpw"),
    ],
)
def test_credential_pairs_and_url_passwords_are_masked(text: str, leaked: str) -> None:
    assert leaked not in redact(text)


def test_ordinary_text_is_left_alone() -> None:
    text = "openrouter error 503: No provider available (skip-list task)"
    assert redact(text) == text


def test_redacted_url_hides_passwords() -> None:
    assert redacted_url("redis://:pw123456@host:6379/0?password=other") == "redis://:***@host:6379/0?password=***"


def test_every_provider_error_is_masked_before_it_is_cut() -> None:
    error = error_for_status(401, "x" * 990 + CONFIGURED, provider="openrouter")
    assert CONFIGURED[:8] not in str(error)
    assert CONFIGURED not in Unavailable(f"Bearer {CONFIGURED}", provider="anthropic").describe()


def test_log_lines_and_their_tracebacks_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    log_redaction.install()
    logger = logging.getLogger("any.module.at.all")
    with caplog.at_level(logging.INFO):
        logger.warning("provider said %s", f"bad key {CONFIGURED}")
        try:
            raise RuntimeError(f"upstream echoed sk-ant-{'q' * 30}")
        except RuntimeError:
            logger.exception("attempt crashed")
    text = caplog.text
    assert CONFIGURED not in text
    assert "q" * 30 not in text
    assert text.count(REDACTED) == 2


def test_json_log_lines_use_the_masked_traceback() -> None:
    log_redaction.install()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.json.redaction")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"key {CONFIGURED}")
        except ValueError:
            logger.error("failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert CONFIGURED not in line["exc_info"]
    assert REDACTED in line["exc_info"]


def test_the_traceback_a_retried_message_carries_into_redis_is_masked() -> None:
    broker = StubBroker(middleware=[RedactTracebacks()])
    broker.declare_queue("default")
    message: Message[Any] = Message(
        queue_name="default",
        actor_name="work",
        args=(),
        kwargs={},
        options={"traceback": f"Traceback ...\nProviderError: Bearer {CONFIGURED}"},
    )
    broker.enqueue(message)
    stored = Message.decode(broker.queues["default"].get_nowait())
    assert CONFIGURED not in stored.options["traceback"]
    broker.close()

"""Dramatiq's own log lines never carry a message's arguments (the prompt)."""

from __future__ import annotations

import logging

import pytest
from dramatiq import Message
from dramatiq.broker import MessageProxy

from actors import log_redaction


def _message() -> MessageProxy:
    return MessageProxy(
        Message(
            queue_name="llm_generate",
            actor_name="generate_llm_response",
            args=(),
            kwargs={"job_id": "j1", "user_id": "u1", "params": {"messages": [{"content": "my secret prompt"}]}},
            options={},
            message_id="m-123",
        )
    )


def test_a_failed_message_is_logged_by_actor_and_id_only(caplog: pytest.LogCaptureFixture) -> None:
    log_redaction.install()
    logger = logging.getLogger("dramatiq.worker.WorkerThread")
    with caplog.at_level(logging.INFO, logger="dramatiq.worker.WorkerThread"):
        logger.error("Failed to process message %s with unhandled exception.", _message())
    assert "my secret prompt" not in caplog.text
    assert "generate_llm_response[m-123]" in caplog.text


def test_a_skipped_message_is_reported_at_info(caplog: pytest.LogCaptureFixture) -> None:
    log_redaction.install()
    logger = logging.getLogger("dramatiq.worker.WorkerThread")
    with caplog.at_level(logging.INFO, logger="dramatiq.worker.WorkerThread"):
        logger.warning("Message %s was skipped.", _message())
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "my secret prompt" not in caplog.text

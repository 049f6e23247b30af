"""Which provider failures are retried, and how long the queue waits before the next attempt."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from actors.retry_policy import InvalidPayload, JobFailed, RetryPolicy
from repositories.errors import (
    AttemptTimedOut,
    RateLimited,
    Rejected,
    StreamBroken,
    Unavailable,
    error_for_status,
)
from repositories.openrouter import OpenRouterProvider, parse_retry_after

POLICY = RetryPolicy(min_backoff_ms=2000, max_backoff_ms=60000)
is_retryable = POLICY.is_retryable


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retried(status: int) -> None:
    error = error_for_status(status, "try later", provider="openrouter")
    assert is_retryable(error)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
def test_request_errors_are_never_retried(status: int) -> None:
    error = error_for_status(status, "no", provider="openrouter")
    assert isinstance(error, Rejected)
    assert not is_retryable(error)


def test_a_429_is_a_rate_limit_carrying_retry_after() -> None:
    error = error_for_status(429, "slow down", provider="openrouter", retry_after_s=7)
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 7


def test_the_stored_error_names_provider_status_and_message() -> None:
    error = error_for_status(503, "No provider available", provider="openrouter")
    assert str(error) == "openrouter error 503: No provider available"


def test_network_failures_and_broken_streams_are_retried() -> None:
    assert is_retryable(Unavailable("timed out", provider="p"))
    assert is_retryable(StreamBroken("cut", provider="p"))


def test_an_attempt_past_its_wall_clock_limit_is_not_retried() -> None:
    assert not is_retryable(AttemptTimedOut("too long", provider="p"))


def test_invalid_payloads_and_failed_jobs_are_not_retried() -> None:
    assert not is_retryable(InvalidPayload("bad"))
    assert not is_retryable(JobFailed("done"))


def test_unexpected_exceptions_are_retried() -> None:
    assert is_retryable(RuntimeError("database hiccup"))


@pytest.mark.parametrize(
    ("code", "retryable"),
    [(502, True), ("server_error", True), (None, True), (429, True), (401, False), (400, False)],
)
def test_mid_stream_error_chunks_are_retried_unless_they_name_a_request_error(
    code: int | str | None, retryable: bool
) -> None:
    provider = OpenRouterProvider(base_url="http://127.0.0.1:9", api_key=None)
    error = provider._stream_error({"code": code, "message": "upstream died"})
    assert error.retryable is retryable
    assert "upstream died" in str(error)


def test_backoff_stays_within_bounds() -> None:
    policy = RetryPolicy(min_backoff_ms=2000, max_backoff_ms=60000)
    for retries in range(10):
        delay = policy.delay_ms(retries, Unavailable("x", provider="p"))
        assert 2000 <= delay <= 60000


def test_backoff_grows_with_retries() -> None:
    policy = RetryPolicy(min_backoff_ms=1000, max_backoff_ms=1_000_000)
    first = policy.delay_ms(0, Unavailable("x", provider="p"))
    third = policy.delay_ms(3, Unavailable("x", provider="p"))
    assert first <= 2000
    assert third >= 8000


def test_retry_after_is_honoured_even_beyond_the_backoff() -> None:
    policy = RetryPolicy(min_backoff_ms=100, max_backoff_ms=400)
    delay = policy.delay_ms(0, RateLimited("x", provider="p", retry_after_s=3))
    assert delay > 3000


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_ten_seconds = parse_retry_after(formatdate(1_000_010, usegmt=True), now=1_000_000)
    assert in_ten_seconds == pytest.approx(10, abs=1)

"""The one retry policy: caps per job kind, classification, backoff and what Dramatiq is told."""

from __future__ import annotations

import pytest
from dramatiq.middleware import Retries

from actors.jobs import InvalidPayload as JobsInvalidPayload
from actors.jobs import JobFailed as JobsJobFailed
from actors.jobs import RetryPolicy as JobsRetryPolicy
from actors.retry_policy import InvalidPayload, JobFailed, RetryPolicy
from repositories.errors import AttemptTimedOut, RateLimited, Rejected, Unavailable
from repositories.store import JobKind

POLICY = RetryPolicy(min_backoff_ms=100, max_backoff_ms=400)


def test_the_contract_caps_are_three_retries_for_generate_and_two_for_preview() -> None:
    assert POLICY.max_retries(JobKind.GENERATE) == 3
    assert POLICY.max_retries(JobKind.PREVIEW) == 2


@pytest.mark.parametrize(("kind", "cap"), [(JobKind.GENERATE, 3), (JobKind.PREVIEW, 2)])
def test_a_retryable_error_is_retried_until_the_kind_cap(kind: JobKind, cap: int) -> None:
    error = Unavailable("down", provider="p", status_code=503)
    assert [POLICY.should_retry(kind, retries, error) for retries in range(cap + 2)] == [True] * cap + [False] * 2


def test_a_final_error_is_never_retried_even_with_retries_left() -> None:
    for error in (Rejected("bad", provider="p", status_code=400), AttemptTimedOut("long", provider="p")):
        assert not POLICY.should_retry(JobKind.GENERATE, 0, error)
    assert not POLICY.should_retry(JobKind.GENERATE, 0, JobFailed("x"))
    assert not POLICY.should_retry(JobKind.GENERATE, 0, InvalidPayload("x"))


def test_unknown_failures_are_retried_and_the_throws_are_not() -> None:
    assert POLICY.is_retryable(RuntimeError("x"))
    assert not POLICY.is_retryable(JobFailed("x"))
    assert not POLICY.is_retryable(InvalidPayload("x"))
    assert POLICY.throws == (JobFailed, InvalidPayload)


@pytest.mark.parametrize("retries", range(8))
def test_the_backoff_stays_within_its_bounds(retries: int) -> None:
    for _ in range(20):  # the backoff has jitter
        assert 100 <= POLICY.delay_ms(retries, Unavailable("x", provider="p")) <= 400


def test_retry_after_is_a_floor_above_the_backoff_and_the_max() -> None:
    for retry_after_s in (0.05, 1, 30):
        delay = POLICY.delay_ms(0, RateLimited("x", provider="p", retry_after_s=retry_after_s))
        assert delay > retry_after_s * 1000
        assert delay >= 100


def test_a_short_retry_after_does_not_shorten_the_backoff() -> None:
    policy = RetryPolicy(min_backoff_ms=2000, max_backoff_ms=60000)
    assert policy.delay_ms(0, RateLimited("x", provider="p", retry_after_s=0.5)) >= 2000


def test_actor_options_carry_the_kind_cap_and_the_exceptions_never_retried() -> None:
    assert POLICY.actor_options(JobKind.GENERATE) == {"max_retries": 3, "throws": (JobFailed, InvalidPayload)}
    assert POLICY.actor_options(JobKind.PREVIEW) == {"max_retries": 2, "throws": (JobFailed, InvalidPayload)}
    assert POLICY.control_actor_options() == {"max_retries": 3, "throws": (InvalidPayload,)}


def test_the_retries_middleware_has_the_policy_bounds_and_default_cap() -> None:
    middleware = RetryPolicy(min_backoff_ms=2000, max_backoff_ms=60000).retries_middleware()
    assert isinstance(middleware, Retries)
    assert (middleware.max_retries, middleware.min_backoff, middleware.max_backoff) == (3, 2000, 60000)
    assert middleware.retry_when is None


def test_caps_can_be_changed_in_one_place_and_every_option_follows() -> None:
    policy = RetryPolicy(100, 400, generate_max_retries=5, preview_max_retries=1, default_max_retries=4)
    assert policy.actor_options(JobKind.GENERATE)["max_retries"] == 5
    assert policy.actor_options(JobKind.PREVIEW)["max_retries"] == 1
    assert policy.retries_middleware().max_retries == 4
    assert not policy.should_retry(JobKind.PREVIEW, 1, RuntimeError("x"))


@pytest.mark.parametrize(("min_ms", "max_ms"), [(0, 10), (500, 100)])
def test_backoff_bounds_must_be_ordered_and_positive(min_ms: int, max_ms: int) -> None:
    with pytest.raises(ValueError, match="backoff bounds"):
        RetryPolicy(min_backoff_ms=min_ms, max_backoff_ms=max_ms)


def test_a_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="retry caps"):
        RetryPolicy(100, 400, preview_max_retries=-1)


def test_the_runner_module_still_exports_the_policy_and_its_exceptions() -> None:
    assert (JobsRetryPolicy, JobsJobFailed, JobsInvalidPayload) == (RetryPolicy, JobFailed, InvalidPayload)

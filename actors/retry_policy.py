"""The one retry policy: how often a job is retried, which failures are, and how long the queue waits.

Everything that decides about retries reads it: the job runner (retry or fail an attempt, and the delay),
the actor decorators (``actor_options``) and the broker's ``Retries`` middleware (``retries_middleware``),
so the cap the runner applies is the cap Dramatiq enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dramatiq.common import compute_backoff
from dramatiq.middleware import Retries

from repositories.errors import ProviderError
from repositories.store import JobKind

#: The contract's caps: at most 3 retries for generate (4 attempts), 2 for preview.
GENERATE_MAX_RETRIES = 3
PREVIEW_MAX_RETRIES = 2
#: The cap of actors without a job kind (the control queue's cancel and cleanup) and Dramatiq's fallback.
DEFAULT_MAX_RETRIES = 3


class JobFailed(Exception):
    """The job was marked failed in the store; the message must not be retried."""


class InvalidPayload(Exception):
    """The message payload was invalid; the job (if identifiable) was marked failed; never retried."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempt caps per job kind, the retryable/final classification, and the backoff between attempts.

    The backoff is exponential within ``[min_backoff_ms, max_backoff_ms]`` and never earlier than a
    provider's ``Retry-After`` (which may exceed ``max_backoff_ms``).
    """

    min_backoff_ms: int
    max_backoff_ms: int
    generate_max_retries: int = GENERATE_MAX_RETRIES
    preview_max_retries: int = PREVIEW_MAX_RETRIES
    default_max_retries: int = DEFAULT_MAX_RETRIES
    throws: tuple[type[Exception], ...] = (JobFailed, InvalidPayload)
    """Exceptions that end a message at once: Dramatiq never retries them, nor does the runner."""

    def __post_init__(self) -> None:
        if self.min_backoff_ms < 1 or self.max_backoff_ms < self.min_backoff_ms:
            raise ValueError(
                f"backoff bounds must satisfy 1 <= min <= max, got {self.min_backoff_ms}..{self.max_backoff_ms} ms"
            )
        caps = (self.generate_max_retries, self.preview_max_retries, self.default_max_retries)
        if min(caps) < 0:
            raise ValueError(f"retry caps must not be negative, got {caps}")

    # -- the cap ----------------------------------------------------------------------------------

    def max_retries(self, kind: JobKind) -> int:
        """How many retries a job of ``kind`` gets after its first attempt."""
        return self.preview_max_retries if kind is JobKind.PREVIEW else self.generate_max_retries

    # -- the classification -----------------------------------------------------------------------

    def is_retryable(self, error: BaseException) -> bool:
        """The contract's classification: provider errors say so themselves; unknown failures are retried."""
        if isinstance(error, ProviderError):
            return error.retryable
        return not isinstance(error, self.throws)

    def should_retry(self, kind: JobKind, retries_so_far: int, error: BaseException) -> bool:
        """Whether an attempt of a ``kind`` job that failed with ``error`` gets another one."""
        return self.is_retryable(error) and retries_so_far < self.max_retries(kind)

    # -- the backoff ------------------------------------------------------------------------------

    def delay_ms(self, retries_so_far: int, error: BaseException) -> int:
        """Milliseconds to wait before the next attempt, after ``retries_so_far`` earlier retries."""
        _, backoff = compute_backoff(retries_so_far, factor=self.min_backoff_ms, max_backoff=self.max_backoff_ms)
        backoff = max(self.min_backoff_ms, min(backoff, self.max_backoff_ms))
        retry_after_s = getattr(error, "retry_after_s", None)
        if retry_after_s is not None:
            backoff = max(backoff, int(retry_after_s * 1000) + 1)
        return backoff

    # -- what Dramatiq is told --------------------------------------------------------------------

    def actor_options(self, kind: JobKind) -> dict[str, Any]:
        """``@dramatiq.actor(**policy.actor_options(kind))``: the kind's cap and the exceptions never retried."""
        return {"max_retries": self.max_retries(kind), "throws": self.throws}

    def control_actor_options(self) -> dict[str, Any]:
        """Options of the actors without a job kind (cancel, cleanup): only an invalid payload is final."""
        return {"max_retries": self.default_max_retries, "throws": (InvalidPayload,)}

    def retries_middleware(self) -> Retries:
        """The broker's ``Retries``: this policy's backoff bounds, its default cap for actors that set none.

        A ``Retry`` the runner raises carries its own delay (``delay_ms``); the bounds apply to a failure
        that escapes the runner (Dramatiq computes the same exponential backoff then).
        """
        return Retries(
            max_retries=self.default_max_retries,
            min_backoff=self.min_backoff_ms,
            max_backoff=self.max_backoff_ms,
        )

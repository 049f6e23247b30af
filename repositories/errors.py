"""One exception hierarchy for every provider, so the retry policy is written once."""

from __future__ import annotations

from repositories.redaction import redact

#: 4xx statuses worth another attempt (every 5xx is too): request timeout, conflict, rate limit.
TRANSIENT_STATUSES = frozenset({408, 409, 429})
#: Error codes that, even inside a started stream, mean the request itself is refused.
PERMANENT_STREAM_ERROR_CODES = frozenset({400, 401, 402, 403, 404, 422})


class ProviderError(Exception):
    """A provider call failed; ``status_code`` is the provider's HTTP status (None for network failures).

    ``str(error)`` is safe to store and log: it holds the status and the provider's message, with every
    secret and key-shaped string masked by ``repositories.redaction`` (the one place every provider uses).
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.message = redact(message)[:1000]
        self.provider = provider
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        super().__init__(self.describe())

    def describe(self) -> str:
        """Return the one-line text stored in a failed job's ``error``."""
        status = f" {self.status_code}" if self.status_code is not None else ""
        return f"{self.provider} error{status}: {self.message}"


class TransientProviderError(ProviderError):
    """A failure that another attempt may not meet: 408, 429, 5xx, network trouble, a broken stream."""

    retryable = True


class RateLimited(TransientProviderError):
    """The provider answered 429; ``retry_after_s`` says how long it asked us to wait, when it did."""


class Unavailable(TransientProviderError):
    """The provider or its upstream is down or overloaded (5xx, 529, 408), or could not be reached."""


class StreamBroken(TransientProviderError):
    """The stream ended early, was cut, or carried an error event after it had started."""


class Rejected(ProviderError):
    """The provider refused the request itself (400, 401, 402, 403, 404, 422): retrying cannot help."""


class AttemptTimedOut(ProviderError):
    """One attempt ran past the worker's wall-clock limit; the job is failed rather than retried."""


def error_for_status(
    status_code: int, message: str, *, provider: str, retry_after_s: float | None = None
) -> ProviderError:
    """Map an HTTP status onto the hierarchy: the one place that decides what is retried."""
    kind: type[ProviderError]
    if status_code == 429:
        kind = RateLimited
    elif status_code >= 500 or status_code in TRANSIENT_STATUSES:
        kind = Unavailable
    else:
        kind = Rejected
    return kind(message, provider=provider, status_code=status_code, retry_after_s=retry_after_s)

"""The kinds of per-user limit: each is one class that decides whether a message may start now.

An actor opts in with the actor option ``user_limit`` (an instance of a ``UserLimit`` subclass). A kind
answers ``admit`` with a ``Decision``: run (``Admit``, possibly holding a concurrency slot until the job
ends), wait parked for a slot (``Park``) or come back after a delay (``Retry``). Adding a kind means
adding one subclass here; ``UserAdmission`` and the middleware only see ``UserLimit``.

``ConcurrencyLimit`` (the default) is ours, on a ``LeaseStore``; ``WindowLimit`` and ``BucketLimit``
reuse Dramatiq's ``WindowRateLimiter`` and ``BucketRateLimiter`` unchanged through a ``StartRateGate``;
only the delay before a refused message is tried again is added.
"""

from __future__ import annotations

from dataclasses import dataclass

from dramatiq.rate_limits import BucketRateLimiter, RateLimiter, WindowRateLimiter
from dramatiq.rate_limits.backend import RateLimiterBackend

from admission.leases import LeaseStore, Parked, now_ms


@dataclass(frozen=True, slots=True)
class Admit:
    """Run the job now. ``slot_limit``: a concurrency slot was taken under that limit, to release at the end."""

    slot_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Park:
    """The message was parked in its key's line; a freed slot brings it back."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Not now: the message goes back to the queue, due after ``delay_ms``."""

    delay_ms: int
    reason: str


Decision = Admit | Park | Retry


@dataclass(frozen=True, slots=True)
class Request:
    """One message asking to start: its limit key (``actor:user``), user, slot holder and what to park.

    ``handoff`` is the parked entry id a freed slot may have been handed to (the message's own entry id).
    """

    key: str
    user_id: str
    holder: str
    entry: Parked
    leases: LeaseStore
    gate: StartRateGate | None
    lease_ms: int

    @property
    def handoff(self) -> str:
        """The entry id a slot handed to this message waits under."""
        return self.entry.id


class UserLimit:
    """A per-user limit of one actor's jobs. Subclasses implement ``admit``; ``park_behind`` is optional."""

    __slots__ = ()

    def admit(self, request: Request) -> Decision:
        """Whether the message may start now (may take a slot or park the message: atomic in the backend)."""
        raise NotImplementedError

    def park_behind(self, request: Request) -> bool:
        """At send time: park the message behind its user's waiting line if one exists (True), else do nothing."""
        del request
        return False


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit(UserLimit):
    """At most ``limit`` of a user's jobs of one actor run at once, across every worker."""

    limit: int

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be at least 1")

    def admit(self, request: Request) -> Decision:
        """Take a lease (or the one handed to this message), else park the message in its user's line."""
        if request.leases.acquire(
            request.key,
            request.holder,
            limit=self.limit,
            lease_ms=request.lease_ms,
            park=request.entry,
            handoff=request.handoff,
        ):
            return Admit(slot_limit=self.limit)
        return Park(f"user at its limit of {self.limit}")

    def park_behind(self, request: Request) -> bool:
        """A user with a line is at its limit: the message joins the line's back without a delivery."""
        return request.leases.park_behind(request.key, request.entry)


class StartRateLimit(UserLimit):
    """A limit on how often jobs start, through one of Dramatiq's rate limiters on the gate's backend."""

    __slots__ = ()

    #: Names the limiter's keys (``<namespace>:<kind>:<key>``).
    kind = "rate"

    def rate_limiter(self, backend: RateLimiterBackend, name: str) -> RateLimiter:
        """The Dramatiq rate limiter enforcing this limit under ``name``."""
        raise NotImplementedError

    def retry_delay_ms(self) -> int:
        """How long a refused message waits before it is tried again, in milliseconds."""
        raise NotImplementedError

    def admit(self, request: Request) -> Decision:
        """Start now if the limiter lets it, else retry after the kind's delay (no gate: no limit)."""
        if request.gate is None:
            return Admit()
        delay_ms = request.gate.try_start(request.key, self)
        if delay_ms is None:
            return Admit()
        return Retry(delay_ms, f"start rate reached, retrying in {delay_ms} ms")


@dataclass(frozen=True, slots=True)
class WindowLimit(StartRateLimit):
    """At most ``limit`` of a user's jobs of one actor start in any sliding window of ``window_s`` seconds."""

    limit: int
    window_s: int

    kind = "window"

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_s < 1:
            raise ValueError("limit and window_s must be at least 1")

    def rate_limiter(self, backend: RateLimiterBackend, name: str) -> RateLimiter:
        """Dramatiq's sliding-window limiter."""
        return WindowRateLimiter(backend, name, limit=self.limit, window=self.window_s)  # type: ignore[no-untyped-call]

    def retry_delay_ms(self) -> int:
        """The window slides by whole seconds: a start frees up on average every window / limit."""
        return max(1000, self.window_s * 1000 // self.limit)


@dataclass(frozen=True, slots=True)
class BucketLimit(StartRateLimit):
    """At most ``limit`` of a user's jobs of one actor start per fixed bucket of ``bucket_ms`` milliseconds."""

    limit: int
    bucket_ms: int

    kind = "bucket"

    def __post_init__(self) -> None:
        if self.limit < 1 or self.bucket_ms < 1:
            raise ValueError("limit and bucket_ms must be at least 1")

    def rate_limiter(self, backend: RateLimiterBackend, name: str) -> RateLimiter:
        """Dramatiq's fixed-bucket limiter."""
        return BucketRateLimiter(backend, name, limit=self.limit, bucket=self.bucket_ms)  # type: ignore[no-untyped-call]

    def retry_delay_ms(self) -> int:
        """Until the next bucket begins."""
        return self.bucket_ms - now_ms() % self.bucket_ms + 1


class StartRateGate:
    """Start-rate limits through Dramatiq's own rate limiters; a refused message retries after a delay."""

    def __init__(self, backend: RateLimiterBackend, *, namespace: str = "llm-throttle") -> None:
        self.backend = backend
        self._ns = namespace

    def try_start(self, key: str, limit: StartRateLimit) -> int | None:
        """None when the job may start now, else the milliseconds to wait before trying again."""
        limiter = limit.rate_limiter(self.backend, f"{self._ns}:{limit.kind}:{key}")
        with limiter.acquire(raise_on_failure=False) as acquired:
            return None if acquired else limit.retry_delay_ms()

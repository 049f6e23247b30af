"""How an attempt ended, as a value, and the one place that records it.

The job runner's attempt returns exactly one outcome: ``Completed``, ``RetryLater``, ``Failed``,
``Cancelled``, ``HandedBack`` (worker shutdown) or ``WaitsForLane`` (a provider lane is closed or was
rate-limited). ``OutcomeRecorder.record`` maps it to the store write (fenced by the delivery's token),
the observer's calls, the log line, and what the actor must do next: raise ``Retry``/``JobFailed``,
requeue the same message without spending a retry, or simply end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, assert_never

from dramatiq.errors import Retry

from actors.observer import JobObserver
from actors.retry_policy import JobFailed
from repositories.chat import Finished
from repositories.store import Job, JobStore, utcnow

if TYPE_CHECKING:
    from actors.jobs import Delivery
    from actors.progress import Running
    from admission.lane_gate import LaneWait

# The runner's log lines keep their logger name.
logger = logging.getLogger("actors.jobs")

Written = TypeVar("Written")


class Persist(Protocol):
    """Runs one store write that ends an attempt, riding out a store outage (``JobRunner._persist``)."""

    def __call__(self, write: Callable[[], Written], /) -> Written: ...


# -- the outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    """The provider's stream ended with its final event: the answer is ``text``."""

    text: str
    finished: Finished


@dataclass(frozen=True, slots=True)
class RetryLater:
    """The attempt failed and the policy grants another one, in ``delay_ms``."""

    delay_ms: int
    reason: str
    """What failed, as stored in the job's ``error`` (the provider's status and message, never a key)."""
    error: BaseException


@dataclass(frozen=True, slots=True)
class Failed:
    """The job ends failed with ``reason``; ``error`` is what the attempt raised (None: nothing was sent)."""

    reason: str
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The job was cancelled while it streamed: the partial ``text`` is kept."""

    text: str


@dataclass(frozen=True, slots=True)
class HandedBack:
    """The worker shuts down: the job goes back to the queue, the same message again, no retry spent."""

    text: str


@dataclass(frozen=True, slots=True)
class WaitsForLane:
    """The job's provider lane is closed (before the request) or was rate-limited (by the request).

    The job goes back to the lane's line: pending with why it waits, the same message again, no retry spent.
    """

    wait: LaneWait


Outcome = Completed | RetryLater | Failed | Cancelled | HandedBack | WaitsForLane


@dataclass(frozen=True, slots=True)
class Answer:
    """What a completed attempt stores: the job's final ``content`` and ``response``."""

    content: str
    response: dict[str, Any]
    model: str
    usage: dict[str, Any] | None


@dataclass(slots=True)
class Attempt:
    """One attempt under way: the claimed job, the delivery that owns it, and how far the attempt got."""

    job: Job
    delivery: Delivery
    answer: Callable[[Completed, str], Answer]
    """Builds what a completed attempt stores from its outcome and the provider's name."""
    provider: str | None = None
    """The provider's name once it was built; None when it could not be."""
    started: float | None = None
    """``time.monotonic()`` when the request went out; None when none did."""
    progress: Running | None = None
    """Its progress writing while it streams; None when no request went out."""
    log_extra: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.log_extra = {
            "job_id": self.job.job_id,
            "user_id": self.job.user_id,
            "kind": str(self.job.kind),
            "attempt": self.job.attempts,
        }

    def using(self, provider: str) -> None:
        self.provider = provider
        self.log_extra["provider"] = provider

    @property
    def kind(self) -> str:
        return str(self.job.kind)

    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started is not None else 0.0


# -- the recorder ---------------------------------------------------------------------------------


class OutcomeRecorder:
    """Maps an attempt's outcome to the store, the observer and the log; raises what the actor must raise."""

    def __init__(self, *, store: JobStore, observer: JobObserver, persist: Persist) -> None:
        self.store = store
        self.observer = observer
        self._persist = persist

    def record(self, outcome: Outcome, attempt: Attempt) -> None:
        """Record ``outcome``; raises ``Retry`` (with its delay) or ``JobFailed`` when the actor must."""
        match outcome:
            case Completed():
                self._completed(outcome, attempt)
            case RetryLater():
                self._retry_later(outcome, attempt)
            case Failed():
                self._failed(outcome, attempt)
            case Cancelled():
                self._cancelled(outcome, attempt)
            case HandedBack():
                self._handed_back(attempt)
            case WaitsForLane():
                self._waits_for_lane(outcome, attempt)
            case _:
                assert_never(outcome)

    def _completed(self, outcome: Completed, attempt: Attempt) -> None:
        elapsed = attempt.elapsed()
        provider = attempt.provider or "none"
        answer = attempt.answer(outcome, provider)
        completed = self._store_completion(attempt, answer, provider)
        usage = outcome.finished.usage
        self.observer.attempt_finished(
            attempt.kind,
            provider,
            "completed",
            elapsed,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost=outcome.finished.cost,
        )
        self.observer.job_finished(attempt.kind, provider, "completed" if completed else "cancelled")
        logger.info("attempt finished in %.2fs", elapsed, extra=attempt.log_extra)

    def _store_completion(self, attempt: Attempt, answer: Answer, provider: str) -> bool:
        """Store the answer; False when a cancel won the race at the last moment (the text is kept)."""
        job_id, owner = attempt.job.job_id, attempt.delivery.token
        if self._persist(
            lambda: self.store.complete(
                job_id,
                owner=owner,
                content=answer.content,
                response=answer.response,
                provider=provider,
                model=answer.model,
                usage=answer.usage,
            )
        ):
            return True
        self._persist(lambda: self.store.keep_partial(job_id, owner=owner, content=answer.content))
        logger.info("completion discarded: job was cancelled", extra={"job_id": job_id})
        return False

    def _retry_later(self, outcome: RetryLater, attempt: Attempt) -> None:
        job = attempt.job
        note = f"attempt {job.attempts} failed: {outcome.reason}; retrying in {outcome.delay_ms / 1000:.1f}s"
        retry_at = utcnow() + timedelta(milliseconds=outcome.delay_ms)
        if self._persist(
            lambda: self.store.release_for_retry(
                job.job_id, owner=attempt.delivery.token, error=note, retry_at=retry_at, count_retry=True
            )
        ):
            logger.warning("%s", note, extra=attempt.log_extra)
            self._attempt_finished(attempt, "retried")
            raise Retry(delay=outcome.delay_ms) from outcome.error
        self._dropped(attempt)

    def _failed(self, outcome: Failed, attempt: Attempt) -> None:
        job = attempt.job
        stored = self._persist(lambda: self.store.fail(job.job_id, error=outcome.reason, owner=attempt.delivery.token))
        if attempt.provider is None:
            # Nothing was sent (the provider could not be built): the job fails the same way on every attempt.
            if stored:
                self.observer.job_finished(attempt.kind, "none", "failed")
            logger.error("job failed: %s", outcome.reason, extra=attempt.log_extra)
            raise JobFailed(outcome.reason) from outcome.error
        if not stored:
            self._dropped(attempt)
            return
        logger.warning("job failed: %s", outcome.reason, extra=attempt.log_extra)
        self._attempt_finished(attempt, "failed")
        self.observer.job_finished(attempt.kind, attempt.provider, "failed")
        raise JobFailed(outcome.reason) from outcome.error

    def _dropped(self, attempt: Attempt) -> None:
        """The failed attempt's write found the job no longer ours: the message simply ends."""
        logger.info("failed attempt dropped: the job was cancelled or taken over", extra=attempt.log_extra)
        self._attempt_finished(attempt, "dropped")

    def _cancelled(self, outcome: Cancelled, attempt: Attempt) -> None:
        elapsed = attempt.elapsed()
        self._persist(
            lambda: self.store.keep_partial(attempt.job.job_id, owner=attempt.delivery.token, content=outcome.text)
        )
        logger.info("attempt stopped: job cancelled after %.2fs", elapsed, extra=attempt.log_extra)
        self._attempt_finished(attempt, "cancelled", elapsed)
        self.observer.job_finished(attempt.kind, attempt.provider or "none", "cancelled")

    def _handed_back(self, attempt: Attempt) -> None:
        elapsed = attempt.elapsed()
        job, delivery = attempt.job, attempt.delivery
        note = f"attempt {job.attempts} stopped: its worker shut down; the job went back to the queue"
        released = self._persist(lambda: self.store.release_for_retry(job.job_id, owner=delivery.token, error=note))
        if released and delivery.requeue:
            delivery.requeue()
        logger.warning("attempt handed back after %.2fs: worker shutting down", elapsed, extra=attempt.log_extra)
        self._attempt_finished(attempt, "handed_back", elapsed)

    def _waits_for_lane(self, outcome: WaitsForLane, attempt: Attempt) -> None:
        job, delivery, wait = attempt.job, attempt.delivery, outcome.wait
        retry_at = datetime.fromtimestamp(wait.until_ms / 1000, tz=UTC) if wait.until_ms else None
        released = self._persist(
            lambda: self.store.release_for_retry(job.job_id, owner=delivery.token, error=wait.note, retry_at=retry_at)
        )
        if released and delivery.requeue is not None:
            delivery.requeue()
        logger.warning("%s; no retry spent", wait.note, extra=attempt.log_extra)
        if attempt.started is not None:
            # The request was made and answered 429/529: the attempt counts as rate-limited.
            self._attempt_finished(attempt, "rate_limited")

    def _attempt_finished(self, attempt: Attempt, outcome: str, elapsed: float | None = None) -> None:
        self.observer.attempt_finished(
            attempt.kind, attempt.provider or "none", outcome, attempt.elapsed() if elapsed is None else elapsed
        )

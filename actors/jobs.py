"""What a worker does with one job message: claim it, stream from the provider, store the outcome.

The actors in ``actors.tasks`` are thin: they validate the payload and hand it to ``JobRunner``,
which is built from plain arguments so tests can run it against a stub provider and SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from actors.cancellation import CancelSignals, CancelWatch
from actors.observer import JobObserver, NullObserver
from actors.outcomes import (
    Answer,
    Attempt,
    Cancelled,
    Completed,
    Failed,
    HandedBack,
    Outcome,
    OutcomeRecorder,
    RetryLater,
    WaitsForLane,
)
from actors.payloads import GenerateMessage, PreviewMessage
from actors.progress import ProgressWriter, Running
from actors.retry_policy import InvalidPayload as InvalidPayload
from actors.retry_policy import JobFailed as JobFailed
from actors.retry_policy import RetryPolicy as RetryPolicy
from actors.stream_loop import StreamLoop
from admission.lanes import estimate_text_tokens
from middleware.busy_threads import BusyThreads
from repositories.chat import ChatMessage, ChatProvider, ChatRequest, Finished, TextDelta
from repositories.errors import AttemptTimedOut, ProviderError, StreamBroken
from repositories.live_text import LiveText
from repositories.sql_deadline import StoreUnavailable
from repositories.store import Job, JobKind, JobStatus, JobStore, is_store_outage, utcnow

if TYPE_CHECKING:
    from admission.lane_gate import LaneGate, LaneWait

logger = logging.getLogger(__name__)

PREVIEW_MAX_CHARS = 250
PREVIEW_PROMPT = (
    "Write a one or two sentence preview of the following document for a tile in a list. "
    "Plain text, no quotes, at most 250 characters."
)
#: How much of a long document the preview model is shown, in characters.
PREVIEW_INPUT_CHARS = 8000


#: How long a delivery that found the store unreachable waits in the delay queue before it tries again, in ms.
STORE_WAIT_REQUEUE_MS = 2000
#: Added to the rest of a live lease before a redelivered copy of its message tries again, in ms.
LEASE_MARGIN_MS = 500

Written = TypeVar("Written")


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a message stands: its id, this delivery's attempt token and how often it was retried already.

    ``token`` is fresh for every delivery (the throttle's slot is held by the same token): it owns the
    job row while this delivery runs it, so a stale copy of the same message can never write.
    """

    message_id: str
    retries: int
    requeue: Callable[[], object] | None = None
    """Enqueue the same message again (same id, same retry count), without counting a retry."""
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    requeue_later: Callable[[int], object] | None = None
    """Like ``requeue``, through the delay queue: the message comes back after the given milliseconds."""


class JobRunner:
    """Runs generate and preview jobs against one provider and the job store."""

    def __init__(
        self,
        *,
        store: JobStore,
        provider_factory: Callable[[], ChatProvider],
        preview_provider_factory: Callable[[], ChatProvider] | None = None,
        preview_model: str,
        retry_policy: RetryPolicy,
        progress_interval_s: float = 0.5,
        lease_s: float = 30.0,
        generate_timeout_s: float = 900.0,
        preview_timeout_s: float = 60.0,
        store_outage_wait_s: float = 300.0,
        cancel_signals: CancelSignals | None = None,
        observer: JobObserver | None = None,
        live_text: LiveText | None = None,
        lanes: LaneGate | None = None,
        stream_loop: StreamLoop | None = None,
        progress_store: JobStore | None = None,
        busy: BusyThreads | None = None,
    ) -> None:
        self.store = store
        self.busy = busy or BusyThreads()
        """The slots of threads running Python outside their streams (``middleware.busy_threads``): a job holds
        one from its start (the broker's first middleware takes it) to its end, except while it streams."""
        self.stream_loop = stream_loop or StreamLoop()
        """The process's one event loop: every attempt's stream runs on it."""
        self.progress = ProgressWriter(progress_store or store, interval_s=progress_interval_s)
        """Writes every running attempt's text and heartbeat, all together, once per ``progress_interval_s``;
        on ``progress_store`` when given (a connection of its own, so that it never waits behind the claims
        and outcomes of hundreds of threads for one of the pool's connections)."""
        self.observer: JobObserver = observer or NullObserver()
        self.live_text = live_text or LiveText()
        self.lanes = lanes
        """Provider lanes: asked right before a request leaves, told of a 429/529 and of the tokens used."""
        self.cancel_signals = cancel_signals
        self._active: set[CancelWatch] = set()
        self._active_lock = threading.Lock()
        self._provider_factory = provider_factory
        self._preview_provider_factory = preview_provider_factory or provider_factory
        self.preview_model = preview_model
        self.retry_policy = retry_policy
        self.progress_interval_s = progress_interval_s
        self.lease_s = lease_s
        self.generate_timeout_s = generate_timeout_s
        self.preview_timeout_s = preview_timeout_s
        self.store_outage_wait_s = store_outage_wait_s
        self.recorder = OutcomeRecorder(store=store, observer=self.observer, persist=self._persist)
        """The one place an attempt's outcome reaches the store, the observer and the log."""

    # -- entry points used by the actors -------------------------------------------------------

    def run_generation(self, message: GenerateMessage, delivery: Delivery) -> None:
        """Run one delivery of a generate message to its end, or raise ``Retry``/``JobFailed``."""
        with (
            self.busy.held(),
            self._riding_out_outages(message.job_id, delivery),
            self._watching(message.job_id) as watch,
        ):
            stored = message.params.model_dump(exclude_none=True)
            job = self._claim(message.job_id, message.user_id, JobKind.GENERATE, delivery, request=stored)
            if job is None:
                return
            with self.live_text.attempt(job.job_id, job.attempts):
                self._attempt(
                    job, delivery, message.params, watch, timeout_s=self.generate_timeout_s, answer=self._generated
                )

    def run_preview(self, message: PreviewMessage, delivery: Delivery) -> None:
        """Run one delivery of a preview message: short content is kept as is, long content is summarised."""
        needs_model = len(message.content) > PREVIEW_MAX_CHARS
        with (
            self.busy.held(),
            self._riding_out_outages(message.job_id, delivery),
            self._watching(message.job_id) as watch,
        ):
            stored = {"title": message.title, "content": message.content}
            job = self._claim(
                message.job_id, message.user_id, JobKind.PREVIEW, delivery, request=stored, count_attempt=needs_model
            )
            if job is None:
                return
            if needs_model:
                request = self._preview_request(message)
                with self.live_text.attempt(job.job_id, job.attempts):
                    self._attempt(
                        job, delivery, request, watch, timeout_s=self.preview_timeout_s, answer=self._previewed
                    )
                return
            self._persist(
                lambda: self.store.complete(
                    job.job_id,
                    owner=delivery.token,
                    content=message.content,
                    response={"preview": message.content, "used_ai": False},
                    provider=None,
                    model=None,
                    usage=None,
                )
            )
            self.observer.job_finished("preview", "none", "completed")
            logger.info("preview kept as is", extra={"job_id": job.job_id, "user_id": job.user_id})

    def _preview_request(self, message: PreviewMessage) -> ChatRequest:
        return ChatRequest(
            model=self.preview_model,
            messages=[
                ChatMessage(role="system", content=PREVIEW_PROMPT),
                ChatMessage(role="user", content=f"Title: {message.title}\n\n{message.content[:PREVIEW_INPUT_CHARS]}"),
            ],
            temperature=0.3,
            max_tokens=100,
        )

    @contextlib.contextmanager
    def _riding_out_outages(self, job_id: str, delivery: Delivery) -> Iterator[None]:
        """An unreachable store sends the message back through the delay queue: no retry spent, never dead-lettered."""
        try:
            yield
        except Exception as error:
            if not is_store_outage(error) or delivery.requeue_later is None:
                raise
            logger.warning(
                "job store unreachable (%s): the message waits %d ms and tries again, without using a retry",
                type(error).__name__,
                STORE_WAIT_REQUEUE_MS,
                extra={"job_id": job_id},
            )
            delivery.requeue_later(STORE_WAIT_REQUEUE_MS)

    def _persist(self, write: Callable[[], Written]) -> Written:
        """Run a store write, retrying it while the store is unreachable, for up to ``store_outage_wait_s``.

        Used for the writes that end an attempt (its outcome is in memory and must not be lost for a
        blip). Past the bound ``StoreUnavailable`` is raised: the row keeps its stale heartbeat and the
        job is run again once the store is back.
        """
        deadline = time.monotonic() + self.store_outage_wait_s
        delay_s = 0.1
        while True:
            try:
                return write()
            except Exception as error:
                if not is_store_outage(error):
                    raise
                if time.monotonic() + delay_s > deadline:
                    raise StoreUnavailable(f"job store unreachable for {self.store_outage_wait_s:.0f}s") from None
                logger.warning("job store unreachable (%s); retrying the write", type(error).__name__)
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    @contextlib.contextmanager
    def _watching(self, job_id: str) -> Iterator[CancelWatch]:
        """Listen for the job's cancel signal (and a shutdown hand-back) from before the claim to the end."""
        watch = CancelWatch(job_id)
        with self._active_lock:
            self._active.add(watch)
        if self.cancel_signals is not None:
            self.cancel_signals.watch(watch)
        try:
            yield watch
        finally:
            if self.cancel_signals is not None:
                self.cancel_signals.unwatch(watch)
            with self._active_lock:
                self._active.discard(watch)

    def hand_back_running(self) -> int:
        """Stop every running attempt of this process and send its job back to the queue (worker shutdown)."""
        with self._active_lock:
            watches = list(self._active)
        for watch in watches:
            watch.hand_back()
        if watches:
            logger.warning("worker shutting down: handing %d running jobs back to the queue", len(watches))
        return len(watches)

    # -- claiming -------------------------------------------------------------------------------

    def _claim(
        self,
        job_id: str,
        user_id: str,
        kind: JobKind,
        delivery: Delivery,
        *,
        request: dict[str, Any],
        count_attempt: bool = True,
    ) -> Job | None:
        """Claim the job for this delivery, creating the row first if web code sent the actor directly."""
        claim = functools.partial(
            self.store.claim,
            job_id,
            owner=delivery.token,
            message_id=delivery.message_id,
            lease_s=self.lease_s,
            user_id=user_id,
            kind=kind,
            count_attempt=count_attempt,
        )
        job = claim() or self._claim_after_creating(job_id, user_id, kind, request, claim, delivery)
        if job is not None and job.attempts <= 1 and job.started_at is not None:
            self.observer.job_started(str(kind), (job.started_at - job.created_at).total_seconds())
        return job

    def _claim_after_creating(
        self,
        job_id: str,
        user_id: str,
        kind: JobKind,
        request: dict[str, Any],
        claim: Callable[[], Job | None],
        delivery: Delivery,
    ) -> Job | None:
        existing = self.store.get(job_id)
        if existing is None:
            self.store.create(job_id=job_id, user_id=user_id, kind=kind, request=request, enqueued=True)
        if existing is None or (
            existing.status is JobStatus.PENDING and existing.user_id == user_id and existing.kind is kind
        ):
            # The row was missing (web code sent the actor directly, or its enqueue had not committed yet: an
            # enqueue commits its row only once the message is sent), or it committed just after the first claim.
            job = claim()
            if job is not None:
                return job
            existing = self.store.get(job_id)
        extra = {"job_id": job_id, "user_id": user_id}
        if existing is not None and (existing.user_id != user_id or existing.kind is not kind):
            logger.warning("message ignored: job belongs to another user or kind", extra=extra)
        elif existing is not None and existing.status is JobStatus.PROCESSING:
            self._wait_for_live_lease(existing, delivery)
        else:
            logger.info("message skipped: job is %s", existing.status if existing else "gone", extra=extra)
        return None

    def _wait_for_live_lease(self, job: Job, delivery: Delivery) -> None:
        """Another attempt holds the job and its heartbeat is fresh: this delivery must not run it now.

        A redelivered copy of that attempt's own message (its worker is presumed dead or is frozen)
        comes back once the lease would be stale, and takes over then if the attempt is really gone.
        A different message is a duplicate (a re-send, an enqueue repeated): the running attempt
        already is the job's one path to completion, so the duplicate ends here.
        """
        extra = {"job_id": job.job_id, "user_id": job.user_id}
        if job.lease_message != delivery.message_id or delivery.requeue_later is None:
            logger.info("duplicate message skipped: another attempt runs the job", extra=extra)
            return
        beat = job.heartbeat_at or utcnow()
        remaining_ms = (beat + timedelta(seconds=self.lease_s) - utcnow()).total_seconds() * 1000
        delay_ms = max(0, int(remaining_ms)) + LEASE_MARGIN_MS
        logger.warning("redelivered while its attempt's lease is live: trying again in %d ms", delay_ms, extra=extra)
        delivery.requeue_later(delay_ms)

    # -- one attempt ----------------------------------------------------------------------------

    def _attempt(
        self,
        job: Job,
        delivery: Delivery,
        request: ChatRequest,
        watch: CancelWatch,
        *,
        timeout_s: float,
        answer: Callable[[Completed, str], Answer],
    ) -> None:
        """Run one attempt to its outcome and record it (which raises ``Retry``/``JobFailed`` when due)."""
        attempt = Attempt(job, delivery, answer)
        outcome = self._outcome(attempt, request, watch, timeout_s)
        try:
            self.recorder.record(outcome, attempt)
        finally:
            if attempt.progress is not None:
                self.progress.settled(attempt.progress)  # its text went with the outcome: no write of its own

    def _outcome(self, attempt: Attempt, request: ChatRequest, watch: CancelWatch, timeout_s: float) -> Outcome:
        """Build the provider, pass the lane, stream: how the attempt ended, as one value."""
        job, delivery = attempt.job, attempt.delivery
        try:
            provider = self._provider_for(job.kind)
        except Exception as exc:
            # A provider that cannot be built (missing key, bad setting) fails the same way on every attempt.
            return Failed(f"provider not configured: {exc}")
        attempt.using(provider.name)
        logger.info("attempt %d started", job.attempts, extra=attempt.log_extra)
        lane_wait = self.lanes.lane_closed(delivery.token) if self.lanes is not None else None
        if lane_wait is not None:
            return WaitsForLane(lane_wait)
        attempt.started = time.monotonic()
        progress = attempt.progress = self.progress.track(job.job_id, delivery.token)
        completed = False
        try:
            with self.busy.released():
                outcome = self.stream_loop.run(
                    self._stream(job, delivery, provider, request, watch, timeout_s, progress)
                )
            completed = isinstance(outcome, Completed)
        except Exception as error:
            lane_wait = self._lane_after_failure(delivery, error, progress)
            if lane_wait is not None:
                return WaitsForLane(lane_wait)
            return self._failure(attempt, error)
        except BaseException as interruption:
            # Shutdown or the time limit: the row stays processing and a redelivery takes the job over.
            logger.warning("attempt interrupted by %s", type(interruption).__name__, extra=attempt.log_extra)
            raise
        finally:
            self.progress.untrack(progress, completed=completed)
        self._report_lane_usage(delivery, outcome)
        return outcome

    def _failure(self, attempt: Attempt, error: Exception) -> RetryLater | Failed:
        """Classify a failed attempt by the retry policy: another attempt after a delay, or the job fails."""
        if isinstance(error, ProviderError):
            description = error.describe()
        else:
            description = f"internal error: {type(error).__name__}"
            logger.exception("attempt crashed", extra=attempt.log_extra)
        job, delivery = attempt.job, attempt.delivery
        if self.retry_policy.should_retry(job.kind, delivery.retries, error):
            return RetryLater(self.retry_policy.delay_ms(delivery.retries, error), description, error)
        return Failed(description, error)

    # -- provider lanes -------------------------------------------------------------------------

    def _lane_after_failure(self, delivery: Delivery, error: Exception, progress: Running) -> LaneWait | None:
        """A 429/529 pauses the delivery's lane (the wait is returned); any other failure settles to what streamed."""
        if self.lanes is None:
            return None
        if isinstance(error, ProviderError):
            wait = self.lanes.rate_limited(delivery.token, status=error.status_code, retry_after_s=error.retry_after_s)
            if wait is not None:
                return wait
        self.lanes.used(
            delivery.token, self.lanes.prompt_estimate(delivery.token) + estimate_text_tokens(progress.chars)
        )
        return None

    def _report_lane_usage(self, delivery: Delivery, outcome: Completed | Cancelled | HandedBack) -> None:
        """Settle the lane's reservation: the provider's usage, else the estimate of what was streamed."""
        if self.lanes is None:
            return
        usage = outcome.finished.usage if isinstance(outcome, Completed) else None
        if usage is not None:
            tokens = usage.total_tokens
        else:
            tokens = self.lanes.prompt_estimate(delivery.token) + estimate_text_tokens(len(outcome.text))
        self.lanes.used(delivery.token, tokens)

    def _provider_for(self, kind: JobKind) -> ChatProvider:
        return self._preview_provider_factory() if kind is JobKind.PREVIEW else self._provider_factory()

    async def _stream(
        self,
        job: Job,
        delivery: Delivery,
        provider: ChatProvider,
        request: ChatRequest,
        watch: CancelWatch,
        timeout_s: float,
        progress: Running,
    ) -> Completed | Cancelled | HandedBack:
        """Read the stream into ``progress``, which the process's ``ProgressWriter`` writes with the heartbeat.

        The stream stops when the cancel signal arrives, or when a heartbeat finds the job no longer ours.
        Nothing here blocks the loop: the few store and Redis calls it makes run in the default executor.
        """

        async def pump() -> Finished:
            answering = self.lanes is not None
            async for event in provider.stream(request):
                if answering and self.lanes is not None:
                    answering = False
                    await asyncio.to_thread(self.lanes.answering, delivery.token)
                if isinstance(event, TextDelta):
                    progress.append(event.text)
                    self.live_text.append(job.job_id, job.attempts, event.text)
                else:
                    return event
            raise StreamBroken("stream ended without a final event", provider=provider.name)

        task = asyncio.create_task(pump())
        signal: asyncio.Task[None] | None = asyncio.create_task(watch.wait())
        lost = asyncio.create_task(progress.lost.wait())
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AttemptTimedOut(
                        f"attempt exceeded the {timeout_s:.0f}s wall-clock limit", provider=provider.name
                    )
                waiting = {task, lost} if signal is None else {task, lost, signal}
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return Completed(progress.text, task.result())
                if signal is not None and signal in done:
                    signal = None
                    if watch.handed_back:
                        return HandedBack(progress.text)
                    if await asyncio.to_thread(self._is_cancelled, job.job_id):
                        return Cancelled(progress.text)
                    logger.warning(
                        "cancel signal for a job that is not cancelled; ignored", extra={"job_id": job.job_id}
                    )
                if lost in done:
                    return Cancelled(progress.text)
        finally:
            for pending in (task, signal, lost):
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ProviderError):
                        await pending

    def _is_cancelled(self, job_id: str) -> bool:
        try:
            job = self.store.get(job_id)
        except Exception as error:
            if not is_store_outage(error):
                raise
            return False  # the next heartbeat that reaches the store tells
        return job is not None and job.status is JobStatus.CANCELLED

    # -- what a completed attempt stores -------------------------------------------------------------

    def _generated(self, result: Completed, provider: str) -> Answer:
        finished = result.finished
        usage = finished.usage.as_dict() if finished.usage else None
        response: dict[str, Any] = {
            "content": result.text,
            "model": finished.model,
            "provider": provider,
            "finish_reason": finished.finish_reason,
            "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        if finished.cost is not None:
            response["cost"] = finished.cost
        return Answer(result.text, response, finished.model, usage)

    def _previewed(self, result: Completed, provider: str) -> Answer:
        finished = result.finished
        preview = " ".join(result.text.split())[:PREVIEW_MAX_CHARS]
        usage = finished.usage.as_dict() if finished.usage else None
        response = {"preview": preview, "used_ai": True, "model": finished.model, "provider": provider}
        if usage:
            response["usage"] = usage
        return Answer(preview, response, finished.model, usage)

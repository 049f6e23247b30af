"""The composition root: one ``JobQueue``, built from ``Settings`` at the entry point, owns every object.

A ``JobQueue`` holds the broker (with its middleware), the admission objects (per-user admission and
the provider lanes), the actor options, and, built on first use so that constructing it opens no
connection, the job store, the job runner and the cancel signals. Its methods are the web-facing API.

``import actors`` builds the default instance from the environment and binds the actors to it, so that
``dramatiq actors`` and ``actors.enqueue_generation(...)`` use it. Tests and benchmarks build their own
instance from their own ``Settings`` and bind the actors to it for as long as they need (``bound``):
the broker, the store and the options the actors run with then always come from that one object.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq

from actors import tasks
from actors.cancellation import CancelSignals, cancel
from actors.jobs import JobRunner
from actors.payloads import (
    GenerateMessage,
    GenerationParams,
    JobRef,
    PreviewMessage,
    is_job_id,
    limits_context,
    new_job_id,
    salvage_identity,
)
from actors.reconciler import Reconciler, job_message
from actors.retry_policy import RetryPolicy
from actors.wiring import (
    ACTOR_KINDS,
    build_broker,
    build_runtime,
    job_metrics,
    lane_gate,
    retry_policy,
    user_admission,
    user_limit,
)
from admission.lane_gate import LaneGate
from admission.leases import RedisLeaseStore, UserLoad
from admission.limits import UserLimit
from admission.user_admission import UserAdmission
from middleware.busy_threads import BusyThreads
from middleware.metrics import JobMetrics
from repositories.sql_deadline import store_unavailable
from repositories.store import Job, JobKind, JobStatus, JobStore
from settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ActorOptions:
    """What the actors run with, derived from ``Settings`` alone (``ActorOptions.of``): no defaults of its own."""

    generate_time_limit_ms: int
    preview_time_limit_ms: int
    retention_days: int
    max_request_bytes: int
    generate_user_limit: UserLimit
    preview_user_limit: UserLimit

    @classmethod
    def of(cls, settings: Settings) -> ActorOptions:
        """Time limits a minute above the attempt limits (the runner stops first), retention and user limits."""
        return cls(
            generate_time_limit_ms=(settings.generate_timeout_s + 60) * 1000,
            preview_time_limit_ms=(settings.preview_timeout_s + 60) * 1000,
            retention_days=settings.job_retention_days,
            max_request_bytes=settings.max_request_bytes,
            generate_user_limit=user_limit(settings, settings.generate_user_concurrency),
            preview_user_limit=user_limit(settings, settings.preview_user_concurrency),
        )

    def for_actor(self, actor_name: str, policy: RetryPolicy) -> dict[str, Any]:
        """The Dramatiq actor options of one actor (read by the middleware at each delivery): its time limit,
        user limit, and from ``policy`` its attempt cap and the exceptions never retried."""
        if actor_name == "generate_llm_response":
            return {
                **policy.actor_options(JobKind.GENERATE),
                "time_limit": self.generate_time_limit_ms,
                "user_limit": self.generate_user_limit,
            }
        if actor_name == "generate_preview":
            return {
                **policy.actor_options(JobKind.PREVIEW),
                "time_limit": self.preview_time_limit_ms,
                "user_limit": self.preview_user_limit,
            }
        return policy.control_actor_options()


@dataclass(frozen=True, slots=True)
class Services:
    """The objects that hold connections: built on first use, closed by ``JobQueue.close``."""

    store: JobStore
    runner: JobRunner
    cancel_signals: CancelSignals | None


class JobQueue:
    """The queue of one process: its broker, admission, options, store, runner and cancel signals."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.options = ActorOptions.of(settings)
        self.retry_policy = retry_policy(settings)
        self.metrics: JobMetrics | None = job_metrics(settings, stuck_probe=self._stuck_counts)
        self.lanes: LaneGate | None = lane_gate(
            settings, self.metrics, on_waiting=self._note_waiting, on_gave_up=self._give_up
        )
        self.admission: UserAdmission = user_admission(settings, self.metrics)
        self.busy = BusyThreads()
        """The process's slots of threads running Python outside their streams (broker middleware and runner)."""
        self.broker = build_broker(
            settings,
            admission=self.admission,
            retry_policy=self.retry_policy,
            metrics=self.metrics,
            lanes=self.lanes,
            hand_back=lambda: self.runner.hand_back_running(),
            on_malformed=self._record_malformed,
            busy=self.busy,
        )
        self._services: Services | None = None
        self._lock = threading.Lock()

    # -- the objects built on first use -------------------------------------------------------------

    def services(self) -> Services:
        """The store (migrated when ``AUTO_MIGRATE`` is on), the runner and the cancel signals, built once."""
        if self._services is None:
            with self._lock:
                if self._services is None:
                    store, runner, signals = build_runtime(
                        self.settings, self.retry_policy, self.metrics, self.lanes, busy=self.busy
                    )
                    self._services = Services(store=store, runner=runner, cancel_signals=signals)
        return self._services

    @property
    def store(self) -> JobStore:
        """The job store."""
        return self.services().store

    @property
    def runner(self) -> JobRunner:
        """The job runner."""
        return self.services().runner

    def close(self) -> None:
        """Close the store's pool and the cancel signals' connection (the broker is left to its owner)."""
        services, self._services = self._services, None
        if services is None:
            return
        services.store.engine.dispose()
        progress_engine = services.runner.progress.store.engine
        if progress_engine is not services.store.engine:
            progress_engine.dispose()
        if services.cancel_signals is not None:
            services.cancel_signals.close()

    def bind(self) -> JobQueue | None:
        """Bind the actors (and ``actors``' API) to this queue: its broker, its options, its store. Returns the
        queue bound before."""
        return tasks.bind(self)

    @contextlib.contextmanager
    def bound(self) -> Iterator[JobQueue]:
        """Bind the actors (and ``actors``' API) to this queue inside the block, then to the one before."""
        previous = tasks.bind(self)
        try:
            yield self
        finally:
            if previous is not None:
                tasks.bind(previous)

    # -- the web-facing API ---------------------------------------------------------------------------

    def enqueue_generation(
        self, user_id: str, params: GenerationParams | dict[str, Any], *, job_id: str | None = None
    ) -> str:
        """Queue a generation for ``user_id`` and return its job id; the same ``job_id`` twice is one job.

        Raises ``ValueError`` (a pydantic ``ValidationError``) naming the bad field; nothing is then written.
        Raises ``StoreUnavailable`` when the job store does not answer within its timeouts.
        """
        message = GenerateMessage.model_validate(
            {"job_id": job_id or new_job_id(), "user_id": user_id, "params": params}, context=self._limits()
        )
        payload = message.model_dump(mode="json", exclude_none=True)
        self._submit(message.job_id, message.user_id, JobKind.GENERATE, payload["params"], payload)
        return message.job_id

    def enqueue_preview(self, user_id: str, title: str, content: str, *, job_id: str | None = None) -> str:
        """Queue a tile preview for ``user_id`` and return its job id; the same ``job_id`` twice is one job."""
        message = PreviewMessage.model_validate(
            {"job_id": job_id or new_job_id(), "user_id": user_id, "title": title, "content": content},
            context=self._limits(),
        )
        payload = message.model_dump(mode="json")
        self._submit(message.job_id, message.user_id, JobKind.PREVIEW, {"title": title, "content": content}, payload)
        return message.job_id

    def cancel_job(self, job_id: str, user_id: str) -> bool:
        """Cancel a pending or processing job of ``user_id``; False if unknown, another user's or finished."""
        if not isinstance(job_id, str) or not isinstance(user_id, str):
            return False
        JobRef.model_validate({"job_id": job_id, "user_id": user_id})
        with _store_errors():
            return self.cancel(job_id, user_id)

    def cancel(self, job_id: str, user_id: str) -> bool:
        """Cancel the user's pending or processing job, signal the worker running it, wake the job's event
        streams (a live text ``status`` entry, best-effort), and take the job out of its user's line if it
        waits there (one call)."""
        signals = self.services().cancel_signals
        if not cancel(self.store, job_id, user_id, publish=signals.publish if signals is not None else None):
            return False
        try:
            # Wakes the job's event streams: a job that never started has no worker to end its live text.
            self.runner.live_text.status_changed(job_id)
        except Exception:
            logger.warning(
                "could not tell the job's event streams of the cancel", exc_info=True, extra={"job_id": job_id}
            )
        try:
            self.admission.take_out(job_id)
        except Exception:
            # The cancel is committed: a parked message left behind is dropped when its slot comes.
            logger.warning("could not take a cancelled job out of the throttle's line", exc_info=True)
        return True

    def get_job(self, job_id: str, user_id: str | None = None) -> Job | None:
        """The job, or None when unknown or (with ``user_id``) another user's."""
        if not is_job_id(job_id):
            return None  # e.g. a NUL byte: no job can have this id, and the store need not be asked
        with _store_errors():
            job = self.store.get(job_id)
        if job is None or (user_id is not None and job.user_id != user_id):
            return None
        return job

    def user_loads(self) -> list[UserLoad]:
        """Jobs running and waiting for a throttle slot, per actor and user, across every worker."""
        return self.admission.loads()

    def reconciler(self, *, pending_after_s: float = 60.0, lease_s: float | None = None) -> Reconciler:
        """The reconciler of this queue's store and broker, with the given bounds in seconds."""
        leases = self.admission.leases if isinstance(self.admission.leases, RedisLeaseStore) else None
        return Reconciler(
            store=self.store,
            broker=self.broker,
            leases=leases,
            lanes=self.lanes.store if self.lanes is not None else None,
            lease_s=lease_s if lease_s is not None else self.runner.lease_s,
            pending_after_s=pending_after_s,
            send=lambda job, delay_ms: self._send(job_message(self.broker, job), delay_ms),
        )

    def resend_unsent(self, *, older_than_s: float = 60.0, lease_s: float | None = None) -> int:
        """Re-send every job that lost its message: the reconciler's sweep (``actors.reconciler``)."""
        return self.reconciler(pending_after_s=older_than_s, lease_s=lease_s).sweep()

    # -- internals --------------------------------------------------------------------------------------

    def _limits(self) -> dict[str, Any]:
        return limits_context(self.options.max_request_bytes)

    def _submit(
        self, job_id: str, user_id: str, kind: JobKind, request: dict[str, Any], payload: dict[str, Any]
    ) -> None:
        """Write the pending row and send its message: the row commits only once the broker has the message.

        One transaction around the send: the insert, the send, the commit. A send that fails rolls the row
        back (nothing written, nothing queued); a process that dies before the commit leaves at most a message
        without a row, which the worker creates from the message as it does for ``actor.send()``. A worker
        fetching the message before the commit waits for the row (PostgreSQL's unique index, SQLite's write
        lock). Should the commit itself fail after the send, ``StoreUnavailable`` is raised although the job
        will run: enqueueing again with the same ``job_id`` is then one job still.
        """
        with _store_errors():
            store = self.store  # built on first use: a store down then is unavailable like any other time
        message = self.broker.get_actor(tasks.JOB_ACTOR_NAMES[kind]).message(**payload)
        with _store_errors(), store.creating(job_id=job_id, user_id=user_id, kind=kind, request=request) as created:
            if created:
                self._send(message)
        if created:
            logger.info("job enqueued", extra={"job_id": job_id, "user_id": user_id, "kind": str(kind)})
            return
        with _store_errors():
            existing = store.get(job_id)
        if existing is not None and existing.user_id != user_id:
            # The same answer as a duplicate of one's own job: nothing tells that this id is someone else's.
            logger.warning("enqueue ignored: job_id belongs to another user", extra={"job_id": job_id})
            return
        if existing is not None and existing.kind is not kind:
            raise ValueError(f"job_id: {job_id!r} is already used by another job")
        if existing is None or existing.status is not JobStatus.PENDING or existing.enqueued_at is not None:
            logger.info("duplicate enqueue ignored", extra={"job_id": job_id, "user_id": user_id})
            return
        # A row written before enqueues were one transaction, whose sender died before sending its message.
        logger.info("re-sending a job whose message was never confirmed", extra={"job_id": job_id})
        self._send(message)
        with _store_errors():
            store.mark_enqueued(job_id)

    def _send(self, message: dramatiq.Message[Any], delay_ms: int = 0) -> None:
        """Enqueue ``message`` (after ``delay_ms``); the broker parks an undelayed one behind its user's line
        when there is one (``admission.sending``), as it does for ``actor.send()``."""
        self.broker.enqueue(message, delay=delay_ms or None)

    def _record_malformed(self, message: Any, reason: str) -> None:
        """Fail the job a malformed message names (when it names one usably) with the reason."""
        kind = ACTOR_KINDS.get(message.actor_name)
        if kind is None:
            return
        fields: dict[str, Any] = {}
        if isinstance(message.args, list | tuple):
            fields.update(zip(("job_id", "user_id"), message.args, strict=False))
        if isinstance(message.kwargs, dict):
            fields.update({name: message.kwargs[name] for name in ("job_id", "user_id") if name in message.kwargs})
        job_id, user_id = salvage_identity(fields)
        if job_id is not None:
            self.store.record_invalid(job_id=job_id, user_id=user_id, kind=kind, error=f"invalid message: {reason}")

    def _note_waiting(self, message: Any, note: str) -> None:
        job_id = message.kwargs.get("job_id")
        if isinstance(job_id, str):
            self.store.note_waiting(job_id, note)

    def _give_up(self, message: Any, error: str) -> None:
        job_id = message.kwargs.get("job_id")
        if isinstance(job_id, str) and self.store.fail(job_id, error=error):
            logger.warning("job failed: %s", error, extra={"job_id": job_id})

    def _stuck_counts(self) -> dict[str, int]:
        stuck = self.reconciler(pending_after_s=self.settings.reconcile_pending_after_s).stuck()
        return {"processing": len(stuck.processing), "pending": len(stuck.pending)}


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Turn a store outage or timeout into ``StoreUnavailable`` (its text carries no SQL and no prompt)."""
    try:
        yield
    except Exception as exc:
        unavailable = store_unavailable(exc)
        if unavailable is None:
            raise
        raise unavailable from None


def current() -> JobQueue:
    """The queue the actors are bound to: the default one ``import actors`` built, unless a test bound its own."""
    return tasks.bound_queue()

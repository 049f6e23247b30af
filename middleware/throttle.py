"""Per-user throttling: a Dramatiq middleware that parks what it cannot start, without burning a retry.

Raising ``RateLimitExceeded`` in an actor counts as a retry and keeps the message cycling through the
queue; this middleware instead decides before the actor runs. A message over its user's limit is
parked with the limiter and acked (``SkipMessage``), so it holds no worker thread and no retry while
it waits. When a job of that user ends, its slot passes straight to the oldest parked message, which
is enqueued again already holding the slot: one redelivery per throttled job, and other users'
messages never wait behind a parked backlog. A message sent through the API while its user already
has a backlog joins the back of it directly (``park_behind_backlog``) and is delivered only once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import SkipMessage

from middleware.attempts import attempt_token_of
from middleware.limiters import (
    BucketLimit,
    ConcurrencyLimit,
    LeaseStore,
    StartRateGate,
    UserLimit,
    UserLoad,
    WindowLimit,
    split_entry,
)

logger = logging.getLogger(__name__)


def user_of(message: Any) -> str | None:
    """The ``user_id`` of a message (keyword or second positional argument), if it is a usable string."""
    user_id = message.kwargs.get("user_id")
    if user_id is None and len(message.args) > 1:
        user_id = message.args[1]
    return user_id if isinstance(user_id, str) and user_id else None


def throttle_of(broker: dramatiq.Broker) -> UserThrottle | None:
    """The broker's ``UserThrottle``, if it has one."""
    return next((m for m in broker.middleware if isinstance(m, UserThrottle)), None)


def holder_of(message: Any) -> str:
    """Who holds a delivery's slot: its attempt token (the one that fences the job row), else its message id."""
    return attempt_token_of(message) or str(message.message_id)


def parked_entry(message: Any) -> bytes:
    """What a parked message is stored as: its id, a newline, the encoded message (see ``split_entry``)."""
    return bytes(message.message_id.encode() + b"\n" + message.encode())


class UserThrottle(dramatiq.Middleware):
    """Admit at most an actor's ``user_limit`` of each user's jobs; park the rest until a slot frees.

    Actors opt in with the actor option ``user_limit`` (a ``ConcurrencyLimit``, ``WindowLimit`` or
    ``BucketLimit``); messages of other actors pass untouched.

    Parameters:
      leases: where concurrency slots and parked messages live (``RedisLeaseStore`` in production).
      gate: window and bucket limits (Dramatiq's rate limiters on a Redis or stub backend).
      lease_ms: how long a slot outlives its last renewal, in milliseconds; a killed worker's slots
        come back after at most this long. Running jobs renew theirs every ``lease_ms / 3``.
      sweep_interval_ms: how often each worker process hands expired slots to parked messages, in ms.
      on_waiting: called after each sweep with the number of parked jobs per actor (for metrics).
    """

    def __init__(
        self,
        *,
        leases: LeaseStore,
        gate: StartRateGate | None = None,
        lease_ms: int = 30_000,
        sweep_interval_ms: int = 2_000,
        on_waiting: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        if lease_ms < 1000:
            raise ValueError("lease_ms must be at least 1000")
        self.leases = leases
        self.gate = gate
        self.lease_ms = lease_ms
        self.sweep_interval_ms = sweep_interval_ms
        self.on_waiting = on_waiting
        self._held: dict[str, tuple[str, int]] = {}
        self._unreleased: list[tuple[str, str, int]] = []
        self._backend_down = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker: dramatiq.Broker | None = None

    #: How long a message waits in the delay queue when the limiter's backend cannot be reached, in ms.
    BACKEND_DOWN_DELAY_MS = 2_000

    @property
    def actor_options(self) -> set[str]:
        """The per-actor option this middleware reads."""
        return {"user_limit"}

    # -- Dramatiq hooks -------------------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start the thread that renews held leases and rescues parked messages of dead workers."""
        self._broker = broker
        self._stop.clear()
        self._thread = threading.Thread(target=self._maintain, name="user-throttle", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Stop the maintenance thread (running jobs still release their slots as they end)."""
        self._stop.set()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Take a slot for the message's user, or park the message and skip it; never run it without one.

        Fails closed: when the limiter's backend cannot be reached (Redis down, its pool exhausted past
        its timeout) the message goes back to the queue after ``BACKEND_DOWN_DELAY_MS`` without spending
        a retry, logged once per outage. Should the broker be unreachable too, the message is held here
        (unacked) and admission is tried again with a backoff.
        """
        wait_s = 0.1
        while True:
            try:
                self._admit(broker, message)
            except SkipMessage:
                raise
            except Exception as exc:
                self._backend_failed("taking a slot", exc)
            else:
                self._backend_answered()
                return
            try:
                broker.enqueue(message.copy(), delay=self.BACKEND_DOWN_DELAY_MS)
            except Exception:
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, 5.0)
                continue
            raise SkipMessage("throttle backend unreachable: back to the queue after a delay")

    def _admit(self, broker: dramatiq.Broker, message: Any) -> None:
        """Take a slot for the message's user, or park the message and skip it."""
        limit, user_id = self._limit_for(broker, message)
        if limit is None or user_id is None:
            return
        key = f"{message.actor_name}:{user_id}"
        if isinstance(limit, ConcurrencyLimit):
            entry = parked_entry(message)
            holder = holder_of(message)
            if self.leases.acquire(
                key,
                holder,
                limit=limit.limit,
                lease_ms=self.lease_ms,
                parked_entry=entry,
                handoff=message.message_id,
            ):
                with self._lock:
                    self._held[holder] = (key, limit.limit)
                return
            logger.info("job parked: user at its limit of %d", limit.limit, extra={"user_id": user_id})
            raise SkipMessage("throttled: parked until a slot of this user frees")
        if self.gate is None:
            return
        delay_ms = self.gate.try_start(key, limit)
        if delay_ms is None:
            return
        broker.enqueue(message.copy(), delay=delay_ms)
        raise SkipMessage(f"throttled: start rate reached, retrying in {delay_ms} ms")

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Give the slot back, handing it to the user's oldest parked message."""
        self._release(broker, holder_of(message))

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message skipped after it took a slot (by a later middleware) gives the slot back too."""
        self._release(broker, holder_of(message))

    # -- the sending side -----------------------------------------------------------------------

    def park_behind_backlog(self, broker: dramatiq.Broker, message: Any) -> bool:
        """Park a message being sent behind its user's parked messages, if any; True when parked.

        Called by the API instead of enqueueing when it sends a job. A user with a backlog is at its
        limit, so a worker would only fetch this message to park it: parking it here saves that
        delivery, and keeps its place in line. With no backlog nothing is written and the caller
        enqueues as usual; the worker decides against the limit (which the sender need not know).
        """
        limit, user_id = self._limit_for(broker, message)
        if not isinstance(limit, ConcurrencyLimit) or user_id is None:
            return False
        if not self.leases.park_behind(f"{message.actor_name}:{user_id}", parked_entry(message)):
            return False
        logger.info("job parked at enqueue behind the user's backlog", extra={"user_id": user_id})
        return True

    def drop_parked(self, broker: dramatiq.Broker, job_id: str, user_id: str) -> int:
        """Take the parked messages of a cancelled job out of its user's lines; how many were dropped.

        Without this a cancelled job would keep its place until a slot reached it, and only then be
        dropped by the worker. Messages are matched on their ``job_id`` keyword argument.
        """
        dropped = 0
        for actor_name in self._limited_actors(broker):
            key = f"{actor_name}:{user_id}"
            for entry in self.leases.parked(key):
                _, body = split_entry(entry)
                if Message.decode(body).kwargs.get("job_id") == job_id and self.leases.unpark(key, entry):
                    dropped += 1
        if dropped:
            logger.info("cancelled job taken out of the throttle's line", extra={"job_id": job_id, "user_id": user_id})
        return dropped

    def _limited_actors(self, broker: dramatiq.Broker) -> list[str]:
        return [
            name
            for name in sorted(broker.get_declared_actors())
            if isinstance(broker.get_actor(name).options.get("user_limit"), ConcurrencyLimit)
        ]

    # -- visibility -----------------------------------------------------------------------------

    def loads(self) -> list[UserLoad]:
        """Running and waiting (parked) jobs per actor and user, across every worker."""
        return self.leases.loads()

    # -- internals ------------------------------------------------------------------------------

    def _limit_for(self, broker: dramatiq.Broker, message: Any) -> tuple[UserLimit | None, str | None]:
        try:
            actor = broker.get_actor(message.actor_name)
        except dramatiq.errors.ActorNotFound:
            return None, None
        limit = actor.options.get("user_limit")
        if not isinstance(limit, ConcurrencyLimit | WindowLimit | BucketLimit):
            return None, None
        return limit, user_of(message)

    def _release(self, broker: dramatiq.Broker, message_id: str) -> None:
        with self._lock:
            held = self._held.pop(message_id, None)
        if held is None:
            return
        key, limit = held
        self._try_release(broker, key, message_id, limit)

    def _try_release(self, broker: dramatiq.Broker, key: str, holder: str, limit: int) -> bool:
        """Release one slot; a failed release is kept and retried by the maintenance thread, not left to expire."""
        try:
            entries = self.leases.release(key, holder, limit=limit, lease_ms=self.lease_ms)
        except Exception as exc:
            with self._lock:
                self._unreleased.append((key, holder, limit))
            self._backend_failed("releasing a slot", exc)
            return False
        self._backend_answered()
        try:
            self._enqueue_handoffs(broker, entries)
        except Exception as exc:  # the handoffs' safety copies are re-enqueued by the sweep (stale_handoffs)
            logger.warning("could not enqueue a throttle handoff now (%s); the sweep will", type(exc).__name__)
        return True

    def _retry_releases(self, broker: dramatiq.Broker) -> None:
        with self._lock:
            pending, self._unreleased = self._unreleased, []
        for index, (key, holder, limit) in enumerate(pending):
            if not self._try_release(broker, key, holder, limit):
                with self._lock:
                    self._unreleased.extend(pending[index + 1 :])
                return
        if pending:
            logger.info("released %d throttle slots kept over a backend outage", len(pending))

    def _backend_failed(self, doing: str, exc: Exception) -> None:
        with self._lock:
            first, self._backend_down = not self._backend_down, True
        if first:
            logger.warning(
                "throttle backend unreachable while %s (%s): jobs wait in the queue until it answers",
                doing,
                type(exc).__name__,
            )

    def _backend_answered(self) -> None:
        if self._backend_down:
            with self._lock:
                recovered, self._backend_down = self._backend_down, False
            if recovered:
                logger.info("throttle backend answers again")

    def _enqueue_handoffs(self, broker: dramatiq.Broker, entries: list[bytes]) -> None:
        for entry in entries:
            holder, body = split_entry(entry)
            broker.enqueue(Message.decode(body))
            self.leases.handed_off(holder)

    def _maintain(self) -> None:
        """Renew held leases every lease/3; hand expired slots to parked messages every sweep interval."""
        renew_every_s = self.lease_ms / 3000
        sweep_every_s = self.sweep_interval_ms / 1000
        next_renew = next_sweep = 0.0
        epoch: str | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if self._unreleased and self._broker is not None:
                self._retry_releases(self._broker)
            try:
                current_epoch = self.leases.epoch()
                restarted = epoch is not None and current_epoch != epoch
                if restarted:
                    # Redis restarted: leases it lost would let other jobs in above the limit; put ours back now.
                    # (Only then: a lease that merely expired, this process being frozen, may be someone's now.)
                    logger.warning("throttle backend restarted: recreating the leases this process holds")
                if restarted or now >= next_renew:
                    with self._lock:
                        held = [(key, holder) for holder, (key, _) in self._held.items()]
                    self.leases.renew(held, lease_ms=self.lease_ms, recreate=restarted)
                    next_renew = now + renew_every_s
                epoch = current_epoch
                if now >= next_sweep and self._broker is not None:
                    self._sweep(self._broker)
                    next_sweep = now + sweep_every_s
            except Exception:
                logger.exception("throttle maintenance failed; retrying")
            self._stop.wait(min(renew_every_s, sweep_every_s, 1.0))

    def _sweep(self, broker: dramatiq.Broker) -> None:
        parked = self.leases.parked_keys()
        for key, limit in parked.items():
            self._enqueue_handoffs(broker, self.leases.release(key, None, limit=limit, lease_ms=self.lease_ms))
        if self.on_waiting is not None:
            waiting: dict[str, int] = {}
            for load in self.leases.loads() if parked else []:
                waiting[load.actor] = waiting.get(load.actor, 0) + load.waiting
            self.on_waiting(waiting)
        for holder, body in self.leases.stale_handoffs(older_than_ms=self.lease_ms):
            logger.warning("re-enqueueing a handed-off message whose worker died", extra={"message_id": holder})
            broker.enqueue(Message.decode(body))
            self.leases.handed_off(holder)

"""Per-user admission: one object shared by the worker's middleware and by the API of every process.

Raising ``RateLimitExceeded`` in an actor counts as a retry and keeps the message cycling through the
queue; admission instead decides before the actor runs. A message over its user's limit is parked in
its user's line and acked (``SkipMessage``), so it holds no worker thread and no retry while it waits.
When a job of that user ends, its slot passes straight to the oldest parked message, which is
enqueued again already holding the slot: one redelivery per throttled job, and other users' messages
never wait behind a parked backlog. A message sent while its user already has a line joins the back of
it directly (``park_behind_backlog``) and is delivered only once; a cancelled job leaves its line in
one call (``take_out``).

Which user (and job) a message counts for comes from the key function given to the constructor
(``admission.keys.job_key`` by default in the composition root); which limit applies comes from the
actor option ``user_limit`` (a ``admission.limits.UserLimit``).
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

from admission.keys import KeyOf
from admission.leases import LeaseStore, Parked, UserLoad
from admission.limits import Admit, Park, Request, StartRateGate, UserLimit
from admission.messages import handing_off, holder_of

logger = logging.getLogger(__name__)

#: The actor option naming an actor's per-user limit.
USER_LIMIT_OPTION = "user_limit"


class UserAdmission:
    """Admit at most an actor's ``user_limit`` of each user's jobs; park the rest until a slot frees.

    Parameters:
      leases: where concurrency slots and parked lines live (``RedisLeaseStore`` in production).
      key_of: a message's ``JobKey`` (its user and job), or None for a message no limit applies to.
      gate: start-rate limits (Dramatiq's rate limiters on a Redis or stub backend); None: not enforced.
      lease_ms: how long a slot outlives its last renewal, in milliseconds; a killed worker's slots
        come back after at most this long. Running jobs renew theirs every ``lease_ms / 3``.
      sweep_interval_ms: how often each worker process hands expired slots to parked messages, in ms.
      backend_down_delay_ms: how long a message waits in the delay queue when the backend cannot be
        reached, in ms (fail closed: it is not run, and no retry is spent).
      on_waiting: called after each sweep with the number of parked jobs per actor (for metrics).
    """

    def __init__(
        self,
        *,
        leases: LeaseStore,
        key_of: KeyOf,
        gate: StartRateGate | None = None,
        lease_ms: int = 30_000,
        sweep_interval_ms: int = 2_000,
        backend_down_delay_ms: int = 2_000,
        on_waiting: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        if lease_ms < 1000:
            raise ValueError("lease_ms must be at least 1000")
        self.leases = leases
        self.key_of = key_of
        self.gate = gate
        self.lease_ms = lease_ms
        self.sweep_interval_ms = sweep_interval_ms
        self.backend_down_delay_ms = backend_down_delay_ms
        self.on_waiting = on_waiting
        self._held: dict[str, tuple[str, int]] = {}
        self._unreleased: list[tuple[str, str, int]] = []
        self._backend_down = False
        self._answered_at = 0.0  # monotonic: when the backend last answered again after an outage
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker: dramatiq.Broker | None = None

    # -- the worker side (the middleware's hooks) -------------------------------------------------

    def start(self, broker: dramatiq.Broker) -> None:
        """Start the thread that renews held leases and rescues parked messages of dead workers."""
        self._broker = broker
        self._stop.clear()
        self._thread = threading.Thread(target=self._maintain, name="user-admission", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the maintenance thread (running jobs still release their slots as they end)."""
        self._stop.set()

    def admit(self, broker: dramatiq.Broker, message: Any) -> None:
        """Return when the message may run; otherwise park or delay it and raise ``SkipMessage``.

        Fails closed: when the backend cannot be reached (Redis down, its pool exhausted past its
        timeout) the message goes back to the queue after ``backend_down_delay_ms`` without spending
        a retry, logged once per outage. Should the broker be unreachable too, the message is held here
        (unacked) and admission is tried again with a backoff.
        """
        wait_s = 0.1
        while True:
            started = time.monotonic()
            try:
                self._admit(broker, message)
            except SkipMessage:
                raise
            except Exception as exc:
                self._backend_failed("taking a slot", exc, started)
            else:
                self._backend_answered()
                return
            try:
                broker.enqueue(message.copy(), delay=self.backend_down_delay_ms)
            except Exception:
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, 5.0)
                continue
            raise SkipMessage("throttle backend unreachable: back to the queue after a delay")

    def release(self, broker: dramatiq.Broker, message: Any) -> None:
        """Give the delivery's slot back (if it took one), handing it to the user's oldest parked message."""
        holder = holder_of(message)
        with self._lock:
            held = self._held.pop(holder, None)
        if held is not None:
            key, limit = held
            self._try_release(broker, key, holder, limit)

    # -- the sending side (the API) ---------------------------------------------------------------

    def park_behind_backlog(self, broker: dramatiq.Broker, message: Any) -> bool:
        """Park a message being sent behind its user's parked messages, if any; True when parked.

        Called by the API (``enqueue_*``, and ``actor.send`` through the broker) instead of enqueueing.
        A user with a line is at its limit, so a worker would only fetch this message to park it:
        parking it here saves that delivery, and keeps its place in line. With no line nothing is
        written and the caller enqueues as usual; the worker decides against the limit.
        """
        found = self._request(broker, message)
        if found is None:
            return False
        limit, request = found
        if not limit.park_behind(request):
            return False
        logger.info("job parked at enqueue behind the user's backlog", extra={"user_id": request.user_id})
        return True

    def take_out(self, job_id: str) -> bool:
        """Take a cancelled job's parked message out of its line (one call); True when one was waiting.

        Without this a cancelled job would keep its place until a slot reached it, and only then be
        dropped by the worker.
        """
        taken = self.leases.take_out(job_id)
        if taken:
            logger.info("cancelled job taken out of the throttle's line", extra={"job_id": job_id})
        return taken

    def loads(self) -> list[UserLoad]:
        """Running and waiting (parked) jobs per actor and user, across every worker."""
        return self.leases.loads()

    # -- internals --------------------------------------------------------------------------------

    def limit_of(self, broker: dramatiq.Broker, message: Any) -> UserLimit | None:
        """The ``user_limit`` of the message's actor, if it has one."""
        try:
            actor = broker.get_actor(message.actor_name)
        except dramatiq.errors.ActorNotFound:
            return None
        limit = actor.options.get(USER_LIMIT_OPTION)
        return limit if isinstance(limit, UserLimit) else None

    def _request(self, broker: dramatiq.Broker, message: Any) -> tuple[UserLimit, Request] | None:
        limit = self.limit_of(broker, message)
        if limit is None:
            return None
        key = self.key_of(message)
        if key is None:
            return None
        entry = Parked(key.job_id or str(message.message_id), bytes(message.encode()))
        request = Request(
            key=f"{message.actor_name}:{key.user_id}",
            user_id=key.user_id,
            holder=holder_of(message),
            entry=entry,
            leases=self.leases,
            gate=self.gate,
            lease_ms=self.lease_ms,
        )
        return limit, request

    def _admit(self, broker: dramatiq.Broker, message: Any) -> None:
        found = self._request(broker, message)
        if found is None:
            return
        limit, request = found
        decision = limit.admit(request)
        if isinstance(decision, Admit):
            if decision.slot_limit is not None:
                with self._lock:
                    self._held[request.holder] = (request.key, decision.slot_limit)
            return
        if isinstance(decision, Park):
            logger.info("job parked: %s", decision.reason, extra={"user_id": request.user_id})
            raise SkipMessage(f"throttled: parked until a slot of this user frees ({decision.reason})")
        broker.enqueue(message.copy(), delay=decision.delay_ms)
        raise SkipMessage(f"throttled: {decision.reason}")

    def _try_release(self, broker: dramatiq.Broker, key: str, holder: str, limit: int) -> bool:
        """Release one slot; a failed release is kept and retried by the maintenance thread, not left to expire."""
        started = time.monotonic()
        try:
            handed = self.leases.release(key, holder, limit=limit, lease_ms=self.lease_ms)
        except Exception as exc:
            with self._lock:
                self._unreleased.append((key, holder, limit))
            self._backend_failed("releasing a slot", exc, started)
            return False
        self._backend_answered()
        try:
            self._enqueue_handoffs(broker, handed)
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

    def _backend_failed(self, doing: str, exc: Exception, started: float) -> None:
        """Note a failed call (logged once per outage); one that began before the backend last answered again
        belongs to the outage already over (a slow call's retries outlasting it), and changes nothing."""
        with self._lock:
            if started < self._answered_at:
                return
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
                    self._answered_at = time.monotonic()
            if recovered:
                logger.info("throttle backend answers again")

    def _enqueue_handoffs(self, broker: dramatiq.Broker, handed: list[Parked]) -> None:
        for entry in handed:
            with handing_off():
                broker.enqueue(Message.decode(entry.body))
            self.leases.handed_off(entry.id)

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
        for entry in self.leases.stale_handoffs(older_than_ms=self.lease_ms):
            logger.warning("re-enqueueing a handed-off message whose worker died", extra={"entry_id": entry.id})
            with handing_off():
                broker.enqueue(Message.decode(entry.body))
            self.leases.handed_off(entry.id)

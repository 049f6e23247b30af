"""The lane gate: a Dramatiq middleware that lets a request leave only when its provider lane has room.

A message whose lane is full, paused after a 429, or waiting for its probe is parked in the lane's line
and acked (``SkipMessage``), exactly as the per-user throttle parks: it holds no worker thread and spends
no retry. Freed capacity goes to the lines round-robin across users, handed to the parked message
itself (which is enqueued again already holding its slot), so a heavy user cannot take a whole account.

The job runner calls four hooks on the same object: ``lane_closed`` right before it sends (a pause that
began after admission keeps the request in), ``answering`` at the answer's first byte (the request counts
in the window from then), ``rate_limited`` on a 429/529 (the lane pauses for every
worker and the job waits in line again, no retry spent) and ``used`` with the tokens really used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import SkipMessage

from admission.lane_store import KEEP_RESERVATION, NOT_SENT, LaneStats, RedisLaneStore
from admission.lanes import Lane, LaneTicket
from admission.leases import now_ms
from admission.messages import handing_off, holder_of, parked_entry, split_entry

logger = logging.getLogger(__name__)

#: Message option: since when (ms) the message waits for its lane; kept across parks, 429s and handoffs.
WAITING_SINCE_OPTION = "lane_waiting_since_ms"
#: Message option set on a handed-off message: it owns the lane slot reserved under its message id.
HANDOFF_OPTION = "lane_handoff"

#: Statuses that pause a lane: rate limited, and Anthropic's overloaded.
PAUSING_STATUSES = frozenset({429, 529})


@dataclass(frozen=True, slots=True)
class LaneWait:
    """Why a job waits for its lane again, and until when at least (ms since the epoch; 0 when unknown)."""

    note: str
    until_ms: int


@dataclass
class _Held:
    lane: Lane
    ticket: LaneTicket
    settle: int = NOT_SENT
    """What the release settles to: nothing was sent until the runner says it sends (``lane_closed``)."""


def _clock(moment_ms: int) -> str:
    return datetime.fromtimestamp(moment_ms / 1000, tz=UTC).strftime("%H:%M:%S")


def _window(lane: Lane) -> str:
    seconds = lane.config.window_s
    return "minute" if seconds == 60 else f"{seconds:g} s"


class LaneGate(dramatiq.Middleware):
    """Admit a message only when its provider lane has room; park it in the lane's line otherwise.

    Parameters:
      store: the lanes' Redis state.
      lanes: this worker's lanes (the sweep hands their free capacity to waiting messages).
      tickets: the lane, user, job and token reservation of a message, or None when it calls no lane.
      lease_ms: a slot outlives its last renewal this long; a killed worker's slots and reservations
        come back within it.
      sweep_interval_ms: how often each process hands free capacity to waiting messages (a pause's end
        is met on time whatever this is).
      max_wait_s: a message waiting longer than this gives up (``on_gave_up``), in seconds.
      on_waiting: called with a parked message and why it waits (the job's status line).
      on_gave_up: called with a message that waited too long and the error; the job must be failed.
      on_sample: called every few seconds with the stats of every lane (metrics).
    """

    def __init__(
        self,
        *,
        store: RedisLaneStore,
        lanes: list[Lane],
        tickets: Callable[[Any], LaneTicket | None],
        lease_ms: int = 30_000,
        sweep_interval_ms: int = 1_000,
        max_wait_s: float = 3600,
        on_waiting: Callable[[Any, str], None] | None = None,
        on_gave_up: Callable[[Any, str], None] | None = None,
        on_sample: Callable[[list[LaneStats]], None] | None = None,
    ) -> None:
        if lease_ms < 1000:
            raise ValueError("lease_ms must be at least 1000")
        self.store = store
        self.lanes = lanes
        self.tickets = tickets
        self.lease_ms = lease_ms
        self.sweep_interval_ms = sweep_interval_ms
        self.max_wait_ms = int(max_wait_s * 1000)
        self.on_waiting = on_waiting
        self.on_gave_up = on_gave_up
        self.on_sample = on_sample
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker: dramatiq.Broker | None = None
        self._backend_down = False

    #: How long a message waits in the delay queue when the lanes' Redis cannot be reached, in ms.
    BACKEND_DOWN_DELAY_MS = 2_000

    # -- Dramatiq hooks -------------------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start the thread that renews leases and hands free capacity (and a pause's probe) to waiting messages."""
        self._broker = broker
        self._stop.clear()
        self._thread = threading.Thread(target=self._maintain, name="lane-gate", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Stop the maintenance thread."""
        self._stop.set()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Take a lane slot and reserve the tokens, or park the message in the lane's line and skip it.

        Fails closed like the throttle: with the lanes' Redis unreachable the message goes back to the
        queue after ``BACKEND_DOWN_DELAY_MS`` without spending a retry.
        """
        try:
            ticket = self.tickets(message)
        except Exception:
            ticket = None  # an invalid payload: the actor rejects it, no provider is called
        if ticket is None:
            return
        try:
            self._admit(broker, message, ticket)
        except SkipMessage:
            raise
        except Exception as exc:
            if not self._backend_down:
                logger.warning("lane backend unreachable (%s): jobs wait in the queue", type(exc).__name__)
            self._backend_down = True
            broker.enqueue(message.copy(), delay=self.BACKEND_DOWN_DELAY_MS)
            raise SkipMessage("lane backend unreachable: back to the queue after a delay") from None
        self._backend_down = False

    def _admit(self, broker: dramatiq.Broker, message: Any, ticket: LaneTicket) -> None:
        lane = ticket.lane
        holder = holder_of(message)
        handoff = message.options.pop(HANDOFF_OPTION, None)
        now = now_ms()
        since = int(message.options.setdefault(WAITING_SINCE_OPTION, now))
        too_long = now - since > self.max_wait_ms
        result = self.store.admit(
            lane,
            holder=holder,
            user_id=ticket.user_id,
            reserve_tokens=ticket.reserve_tokens,
            prompt_tokens=ticket.prompt_tokens,
            lease_ms=self.lease_ms,
            parked_entry=None if too_long else parked_entry(message),
            waiting_since_ms=since,
            handoff=str(message.message_id) if handoff else None,
        )
        self._enqueue_handoffs(broker, result.handoffs)
        if result.admitted:
            with self._lock:
                self._held[holder] = _Held(lane, ticket)
            if result.reason == "probe":
                logger.info("probe request of lane %s after its pause", lane.label(), extra={"job_id": ticket.job_id})
            return
        note = self._note(lane, result.reason)
        if too_long:
            error = f"gave up after waiting {self.max_wait_ms // 1000} s for {lane.provider}: {note}"
            logger.warning("%s", error, extra={"job_id": ticket.job_id, "user_id": ticket.user_id})
            if self.on_gave_up is not None:
                self.on_gave_up(message, error)
            raise SkipMessage("gave up waiting for its lane")
        if self.on_waiting is not None:
            try:
                self.on_waiting(message, f"waiting for {lane.provider}: {note}")
            except Exception:
                logger.warning("could not record why a job waits", exc_info=True)
        logger.info("job waits for lane %s: %s", lane.label(), note, extra={"job_id": ticket.job_id})
        raise SkipMessage(f"waiting for its lane: {result.reason}")

    def _note(self, lane: Lane, reason: str) -> str:
        config = lane.config
        if reason == "paused":
            until, _ = self.store.paused_until(lane)
            return f"paused until {_clock(until)} after a 429"
        if reason == "probing":
            return "one probe request checks whether it takes requests again"
        if reason == "line":
            return "in line (round-robin across users)"
        if reason == "concurrency":
            return f"at its limit of {config.concurrent} concurrent requests"
        if reason == "requests":
            return f"at its limit of {config.requests_per_minute} requests per {_window(lane)}"
        return f"at its limit of {config.tokens_per_minute} tokens per {_window(lane)}"

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Free the slot, settle the tokens to what the attempt used, hand capacity to waiting messages."""
        self._release(broker, message, sent=True)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message skipped after it took (or was handed) a lane slot gives it back, its reservation undone."""
        self._release(broker, message, sent=False)

    # -- the runner's hooks ---------------------------------------------------------------------

    def lane_closed(self, token: str) -> LaneWait | None:
        """Right before sending: a wait when the lane was paused after this delivery was admitted, else None
        (and the request counts in its lane's window from now: the provider's clock starts about now too)."""
        with self._lock:
            held = self._held.get(token)
        if held is None:
            return None
        until = self.store.sending(held.lane, token, lease_ms=self.lease_ms)
        if until == 0:
            held.settle = KEEP_RESERVATION
            return None
        note = f"waiting for {held.lane.provider}: paused until {_clock(until)} after a 429"
        return LaneWait(note, until)

    def answering(self, token: str) -> None:
        """The first byte of this delivery's answer arrived: its request counts in its lane's window from now."""
        with self._lock:
            held = self._held.get(token)
        if held is None:
            return
        try:
            self.store.answering(held.lane, token, lease_ms=self.lease_ms)
        except Exception as exc:  # the stamp at sending stands; the stream must not fail for it
            logger.warning("could not re-stamp a lane request (%s)", type(exc).__name__)

    def rate_limited(self, token: str, *, status: int | None, retry_after_s: float | None) -> LaneWait | None:
        """Pause this delivery's lane after a 429/529 (for every worker); the wait, or None when no lane admitted it."""
        if status not in PAUSING_STATUSES:
            return None
        with self._lock:
            held = self._held.get(token)
        if held is None:
            return None
        lane = held.lane
        until = self.store.pause(
            lane, holder=token, retry_after_s=retry_after_s, lease_ms=self.lease_ms, reason=str(status)
        )
        held.settle = 0
        told = "no Retry-After" if retry_after_s is None else f"Retry-After {retry_after_s:g} s"
        logger.warning(
            "lane %s paused until %s after a %s (%s)",
            lane.label(),
            _clock(until),
            status,
            told,
            extra={"job_id": held.ticket.job_id},
        )
        return LaneWait(f"waiting for {lane.provider}: paused until {_clock(until)} after a {status}", until)

    def used(self, token: str, tokens: int) -> None:
        """Record the tokens this delivery's request really used; its reservation is settled to them."""
        with self._lock:
            held = self._held.get(token)
        if held is not None:
            held.settle = max(0, tokens)

    def prompt_estimate(self, token: str) -> int:
        """The prompt estimate reserved for this delivery (0 when it holds no lane slot)."""
        with self._lock:
            held = self._held.get(token)
        return held.ticket.prompt_tokens if held is not None else 0

    # -- visibility -----------------------------------------------------------------------------

    def stats(self) -> list[LaneStats]:
        """Every lane of this worker: requests and tokens in the window, slots, pause, waiting jobs."""
        return [self.store.stats(lane, lease_ms=self.lease_ms) for lane in self.lanes]

    # -- internals ------------------------------------------------------------------------------

    def _release(self, broker: dramatiq.Broker, message: Any, *, sent: bool) -> None:
        holder = holder_of(message)
        with self._lock:
            held = self._held.pop(holder, None)
        lane: Lane | None
        if held is not None:
            lane, who, settle = held.lane, holder, held.settle if sent else NOT_SENT
        elif message.options.get(HANDOFF_OPTION):
            # Handed a slot, then skipped before this gate ran (the user throttle parked it): give it back.
            ticket = self._ticket_or_none(message)
            if ticket is None:
                return
            lane, who, settle = ticket.lane, str(message.message_id), NOT_SENT
        else:
            return
        try:
            released = self.store.release(lane, who, settle_tokens=settle, lease_ms=self.lease_ms)
            self._enqueue_handoffs(broker, released.handoffs)
        except Exception as exc:  # the lease expires and the sweep hands the capacity on
            logger.warning("could not release a lane slot now (%s); its lease will", type(exc).__name__)

    def _ticket_or_none(self, message: Any) -> LaneTicket | None:
        try:
            return self.tickets(message)
        except Exception:
            return None

    def _enqueue_handoffs(self, broker: dramatiq.Broker, entries: list[bytes]) -> None:
        for entry in entries:
            message_id, body = split_entry(entry)
            message = Message.decode(body)
            message.options[HANDOFF_OPTION] = True
            with handing_off():  # it holds its lane slot: never parked at send behind its user's line
                broker.enqueue(message)
            self.store.handed_off(message_id)

    def _maintain(self) -> None:
        """Renew leases every lease/3; hand free capacity on every sweep, and exactly when a pause ends or the
        oldest request of a full window leaves it (whichever comes first)."""
        renew_every_s = self.lease_ms / 3000
        next_renew = next_sample = next_expiry = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            wake_s = self.sweep_interval_ms / 1000
            try:
                if now >= next_renew:
                    with self._lock:
                        held = [(h.lane, holder) for holder, h in self._held.items()]
                    self.store.renew(held, lease_ms=self.lease_ms)
                    next_renew = now + renew_every_s
                if self._broker is not None:
                    wake_s = min(wake_s, self._sweep(self._broker))
                    if now >= next_expiry:
                        self._give_up_expired(self._broker)
                        next_expiry = now + 5
                if self.on_sample is not None and now >= next_sample:
                    self.on_sample(self.stats())
                    next_sample = now + 5
            except Exception:
                logger.exception("lane maintenance failed; retrying")
            self._stop.wait(max(0.005, min(wake_s, renew_every_s)))

    def _sweep(self, broker: dramatiq.Broker) -> float:
        """Hand free capacity of every lane on; the seconds until a pause ends or a window frees capacity."""
        wake_s = float("inf")
        for lane in self.lanes:
            released = self.store.release(lane, None, settle_tokens=KEEP_RESERVATION, lease_ms=self.lease_ms)
            self._enqueue_handoffs(broker, released.handoffs)
            now = now_ms()
            for moment in (released.paused_until_ms, released.next_free_ms):
                if moment > now:
                    wake_s = min(wake_s, (moment - now) / 1000 + 0.002)
        for message_id, body in self.store.stale_handoffs(older_than_ms=self.lease_ms):
            logger.warning("re-enqueueing a lane handoff whose worker died", extra={"message_id": message_id})
            message = Message.decode(body)
            message.options[HANDOFF_OPTION] = True
            with handing_off():  # it holds its lane slot: never parked at send behind its user's line
                broker.enqueue(message)
            self.store.handed_off(message_id)
        return wake_s

    def _give_up_expired(self, broker: dramatiq.Broker) -> None:
        for lane in self.lanes:
            for entry in self.store.expired_waiting(lane, older_than_ms=self.max_wait_ms, lease_ms=self.lease_ms):
                _, body = split_entry(entry)
                message = Message.decode(body)
                error = f"gave up after waiting {self.max_wait_ms // 1000} s for {lane.provider}"
                logger.warning("%s", error, extra={"message_id": message.message_id})
                if self.on_gave_up is not None:
                    self.on_gave_up(message, error)

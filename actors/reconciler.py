"""The reconciler: the store is the truth, and every job that is not final keeps one live path to completion.

A job's path is its message: queued, delayed, prefetched or running in a worker (all in Dramatiq's
``<queue>.msgs`` hashes until acked), parked by the throttle or in a provider lane's line, or handed a
throttle or lane slot. Routine infrastructure events break that path: Redis restarted without
persistence loses every message, a message dead-lettered while the store was down leaves its row
``processing``, a worker's process dies between two writes. The sweep finds

- ``processing`` jobs whose heartbeat is older than the job lease, and
- ``pending`` jobs untouched (and not waiting for a due retry) for longer than ``pending_after_s``,

and re-sends those with no message anywhere in Redis. With RabbitMQ as the broker (``BROKER_URL``) the
queues cannot be read, so only pending jobs whose message was never sent are re-sent; RabbitMQ itself
keeps confirmed messages through restarts and redelivers those of a dead worker.

The re-sent message carries the job's spent
provider retries (``retries``), so an infrastructure loss costs no retry; a processing job whose
attempt is gone first goes back to ``pending``. Each re-send is a compare-and-set against the row as
the sweep read it, so several schedulers may sweep at once and a job that moved meanwhile is left
alone. A duplicate message (the old one was not lost after all) is harmless: only one delivery can
claim the row, and a duplicate that finds another attempt running ends at once.

Time to recovery after the fault ends is at most ``max(JOB_LEASE_S, RECONCILE_PENDING_AFTER_S) +
RECONCILE_INTERVAL_S`` (90 s with the defaults), plus the next delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import dramatiq
import redis
from dramatiq.common import dq_name

from admission.lane_store import RedisLaneStore
from admission.leases import RedisLeaseStore
from brokers.rabbitmq import is_rabbitmq
from repositories.store import Job, JobKind, JobStatus, JobStore, utcnow

logger = logging.getLogger(__name__)

#: The job ids of every message alive in Redis, read in one atomic step: a message moving from one
#: place to another (parked -> handed off -> queued -> delayed, or into and out of a provider lane's line)
#: is never missed between two reads.
_LIVE_JOB_IDS = """
local ids = {}
local function add(body)
  local ok, message = pcall(cjson.decode, body)
  if not ok or type(message) ~= 'table' then return end
  local job_id = nil
  if type(message.kwargs) == 'table' then job_id = message.kwargs.job_id end
  if job_id == nil and type(message.args) == 'table' then job_id = message.args[1] end
  if type(job_id) == 'string' then ids[#ids + 1] = job_id end
end
for _, key in ipairs(KEYS) do
  for _, body in ipairs(redis.call('hvals', key)) do add(body) end
end
-- The throttle keys parked and handed-off entries by job id: their ids are read, no message decoded.
if ARGV[1] ~= '' then
  for _, id in ipairs(redis.call('hkeys', ARGV[1])) do ids[#ids + 1] = id end
  for _, id in ipairs(redis.call('hkeys', ARGV[2])) do ids[#ids + 1] = id end
end
-- The provider lanes key their lines and handoffs by message id: each entry is 'message id' (a parked
-- entry) or 'stamp' (a handoff), a newline, the encoded message, which is decoded for its job id.
local function add_after_newline(value)
  local sep = string.find(value, '\\n', 1, true)
  if sep then add(string.sub(value, sep + 1)) end
end
if ARGV[3] ~= '' then
  for _, line in ipairs(redis.call('smembers', ARGV[3])) do
    for _, entry in ipairs(redis.call('lrange', ARGV[4] .. line, 0, -1)) do add_after_newline(entry) end
  end
  for _, value in ipairs(redis.call('hvals', ARGV[5])) do add_after_newline(value) end
end
return ids
"""

#: The actors whose messages carry jobs.
JOB_ACTORS = {JobKind.GENERATE: "generate_llm_response", JobKind.PREVIEW: "generate_preview"}


@dataclass(frozen=True, slots=True)
class StuckJobs:
    """Jobs with no live path to completion right now."""

    processing: list[Job]
    """Processing jobs with a stale heartbeat and no message in Redis (their attempt is gone)."""
    pending: list[Job]
    """Pending jobs untouched for longer than the bound and with no message in Redis."""

    @property
    def total(self) -> int:
        """How many jobs are stuck."""
        return len(self.processing) + len(self.pending)


class Reconciler:
    """Finds jobs without a live message and re-sends them (see the module docstring).

    Parameters:
      store: the job store.
      broker: the Redis broker the job actors are declared on.
      leases: the throttle's Redis lease store (parked and handed-off messages), if the throttle is used.
      lanes: the provider lanes' Redis store (messages waiting in a lane's line or handed off), if lanes are used.
      lease_s: a processing job's heartbeat older than this, in seconds, means its attempt is gone.
      pending_after_s: a pending job untouched this long, in seconds, is checked against the broker.
      send: enqueues a message for the job (a function of the job and the delay in milliseconds).
    """

    def __init__(
        self,
        *,
        store: JobStore,
        broker: dramatiq.Broker,
        leases: RedisLeaseStore | None,
        lanes: RedisLaneStore | None,
        lease_s: float,
        pending_after_s: float,
        send: Callable[[Job, int], object],
    ) -> None:
        self.store = store
        self.broker = broker
        self.leases = leases
        self.lanes = lanes
        self.lease_s = lease_s
        self.pending_after_s = pending_after_s
        self.send = send
        client = cast(redis.Redis, broker.client)  # type: ignore[attr-defined]
        self._client = client
        self._live_job_ids = client.register_script(_LIVE_JOB_IDS)

    def live_job_ids(self) -> set[str]:
        """The job ids of every message queued, delayed, unacked, parked or handed off in Redis (by the
        throttle or a provider lane)."""
        namespace = getattr(self.broker, "namespace", "dramatiq")
        queues = {self.broker.get_actor(name).queue_name for name in JOB_ACTORS.values()}
        keys = [f"{namespace}:{name}.msgs" for queue in sorted(queues) for name in (queue, dq_name(queue))]
        if is_rabbitmq(self.broker):
            keys = []  # RabbitMQ's queues cannot be read without consuming them: only Redis's side is seen
        args = ["", "", "", "", ""]
        if self.leases is not None:
            args[0:2] = [self.leases.parked_index_key, self.leases.handoffs_key]
        if self.lanes is not None:
            args[2:5] = [self.lanes.parked_keys_key, self.lanes.parked_prefix, self.lanes.handoffs_key]
        found = cast(list[bytes], self._live_job_ids(keys=keys, args=args))
        return {raw.decode() for raw in found}

    def stuck(self, *, limit: int = 1000) -> StuckJobs:
        """The jobs that have no live path to completion now (a read: nothing is changed)."""
        now = utcnow()
        candidates = self.store.stranded_candidates(
            pending_before=now - timedelta(seconds=self.pending_after_s),
            stale_before=now - timedelta(seconds=self.lease_s),
            limit=limit,
        )
        if not candidates:
            return StuckJobs([], [])
        live = self.live_job_ids()
        lost = [job for job in candidates if job.job_id not in live]
        if is_rabbitmq(self.broker):
            # What RabbitMQ holds is invisible here, and it loses nothing it confirmed: it keeps queued messages
            # on disk and redelivers a dead consumer's unacked ones. Only a job never sent is known to be lost.
            lost = [job for job in lost if job.status is JobStatus.PENDING and job.enqueued_at is None]
        return StuckJobs(
            processing=[job for job in lost if job.status is JobStatus.PROCESSING],
            pending=[job for job in lost if job.status is JobStatus.PENDING],
        )

    def sweep(self) -> int:
        """Re-send every stuck job (one compare-and-set each); return how many were re-sent."""
        stuck = self.stuck()
        resent = 0
        for job in [*stuck.processing, *stuck.pending]:
            if self.resend(job, reason="its message was lost"):
                resent += 1
        if resent:
            logger.warning("reconciler re-sent %d jobs whose messages were lost", resent)
        return resent

    def resend(self, job: Job, *, reason: str) -> bool:
        """Re-send one job read from the store, unless it moved since; True when this call sent it."""
        note = f"attempt {job.attempts} lost ({reason}); sent again without using a retry"
        if not self.store.take_for_resend(job, note=note):
            return False
        now = utcnow()
        delay_ms = 0
        if job.status is JobStatus.PENDING and job.not_before is not None and job.not_before > now:
            delay_ms = int((job.not_before - now).total_seconds() * 1000)
        self.send(job, delay_ms)
        logger.warning("re-sent a %s job: %s", job.status, reason, extra={"job_id": job.job_id, "user_id": job.user_id})
        return True


def job_message(broker: dramatiq.Broker, job: Job) -> dramatiq.Message[Any]:
    """A new message for ``job`` built from its stored request, carrying the provider retries it spent."""
    actor = broker.get_actor(JOB_ACTORS[job.kind])
    kwargs: dict[str, Any] = {"job_id": job.job_id, "user_id": job.user_id}
    if job.kind is JobKind.GENERATE:
        kwargs["params"] = job.request
    else:
        kwargs.update(job.request)
    return actor.message_with_options(kwargs=kwargs, retries=job.retries)

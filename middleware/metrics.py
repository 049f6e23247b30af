"""Job metrics for Prometheus, exposed by Dramatiq's own Prometheus middleware and exposition server.

Dramatiq's ``Prometheus`` middleware counts messages per queue and actor and serves every worker
process's metrics (multiprocess mode) on ``dramatiq_prom_host:dramatiq_prom_port``. ``JobMetrics``
adds what a message count cannot tell: jobs by kind, provider and final status, the wait before a
job starts, provider latency, tokens, cost, and the throttled jobs waiting per actor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import dramatiq

logger = logging.getLogger(__name__)

#: Seconds: from a few milliseconds of queueing to an hour behind a throttle.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: Seconds: one attempt, from a short preview to a long generation.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)


class JobMetrics(dramatiq.Middleware):
    """Creates the job metrics in each worker process (after Dramatiq's ``Prometheus`` set multiprocess mode).

    It is also the job runner's observer, and the throttle's sink for the waiting gauge.
    """

    def __init__(self, *, stuck_probe: Callable[[], dict[str, int]] | None = None, stuck_every_s: float = 30.0) -> None:
        """``stuck_probe`` counts stuck jobs by status (the reconciler's view); sampled every ``stuck_every_s``."""
        self._ready = False
        self._seen_actors: set[str] = set()
        self._stuck_probe = stuck_probe
        self._stuck_every_s = stuck_every_s
        self._stop = threading.Event()

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Create the metrics; ``prometheus_client`` is imported only now, in multiprocess mode."""
        import prometheus_client as prom

        self.jobs_started = prom.Counter("llm_jobs_started_total", "Jobs whose first attempt began.", ["kind"])
        self.jobs_finished = prom.Counter(
            "llm_jobs_finished_total", "Jobs that reached a final status.", ["kind", "provider", "status"]
        )
        self.wait_seconds = prom.Histogram(
            "llm_job_wait_seconds", "Time from enqueue to the first attempt.", ["kind"], buckets=WAIT_BUCKETS
        )
        self.attempt_seconds = prom.Histogram(
            "llm_provider_attempt_seconds",
            "Duration of one provider attempt, by outcome.",
            ["kind", "provider", "outcome"],
            buckets=LATENCY_BUCKETS,
        )
        self.tokens = prom.Counter("llm_tokens_total", "Tokens used.", ["kind", "provider", "type"])
        self.cost = prom.Counter("llm_cost_total", "Cost reported by the provider (credits or USD).", ["provider"])
        self.throttled_waiting = prom.Gauge(
            "llm_throttled_jobs_waiting",
            "Jobs parked by the per-user throttle, by actor.",
            ["actor"],
            multiprocess_mode="max",
        )
        self.stuck_jobs = prom.Gauge(
            "llm_jobs_stuck",
            "Jobs with no message in the broker: processing with a stale heartbeat, or pending too long.",
            ["status"],
            multiprocess_mode="max",
        )
        self._ready = True

    def after_worker_boot(self, broker: dramatiq.Broker, worker: object) -> None:
        """Start sampling the stuck jobs, when a probe is configured."""
        if self._stuck_probe is not None:
            self._stop.clear()
            threading.Thread(target=self._sample_stuck, name="stuck-jobs-metric", daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: object) -> None:
        """Stop sampling."""
        self._stop.set()

    def _sample_stuck(self) -> None:
        probe = self._stuck_probe
        while probe is not None and not self._stop.wait(self._stuck_every_s):
            try:
                counts = probe()
            except Exception as exc:
                logger.warning("stuck jobs not sampled (%s)", type(exc).__name__)
                continue
            if self._ready:
                for status in ("pending", "processing"):
                    self.stuck_jobs.labels(status).set(counts.get(status, 0))

    def job_started(self, kind: str, wait_s: float) -> None:
        """Count a start and its wait."""
        if self._ready:
            self.jobs_started.labels(kind).inc()
            self.wait_seconds.labels(kind).observe(max(0.0, wait_s))

    def attempt_finished(
        self,
        kind: str,
        provider: str,
        outcome: str,
        duration_s: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float | None = None,
    ) -> None:
        """Record the attempt's latency, tokens and cost."""
        if not self._ready:
            return
        self.attempt_seconds.labels(kind, provider, outcome).observe(duration_s)
        if prompt_tokens:
            self.tokens.labels(kind, provider, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(kind, provider, "completion").inc(completion_tokens)
        if cost:
            self.cost.labels(provider).inc(cost)

    def job_finished(self, kind: str, provider: str, status: str) -> None:
        """Count a final status."""
        if self._ready:
            self.jobs_finished.labels(kind, provider, status).inc()

    def sample_waiting(self, waiting_by_actor: dict[str, int]) -> None:
        """Set the waiting gauge (called by the throttle's maintenance thread)."""
        if self._ready:
            self._seen_actors.update(waiting_by_actor)
            for actor in self._seen_actors:
                self.throttled_waiting.labels(actor).set(waiting_by_actor.get(actor, 0))

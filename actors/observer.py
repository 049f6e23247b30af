"""What the job runner reports about jobs, for whoever watches: metrics or nobody.

``middleware.metrics.JobMetrics`` is such an observer. It matches the protocol without importing it: it is
a Dramatiq middleware below ``actors``, and importing ``actors`` builds the default queue.
"""

from __future__ import annotations

from typing import Protocol


class JobObserver(Protocol):
    """What the job runner reports about jobs."""

    def job_started(self, kind: str, wait_s: float) -> None:
        """A job's first attempt began ``wait_s`` seconds after it was created."""
        return  # the protocol's default: ignored

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
        """One provider attempt ended (``completed``, ``retried``, ``failed``, ``cancelled``, ``handed_back``)."""
        return  # the protocol's default: ignored

    def job_finished(self, kind: str, provider: str, status: str) -> None:
        """A job reached a final status."""
        return  # the protocol's default: ignored


class NullObserver(JobObserver):
    """The observer when metrics are off: it ignores everything (the protocol's methods do nothing)."""

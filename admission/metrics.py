"""Prometheus gauges of the provider lanes, set from the lane gate's maintenance thread."""

from __future__ import annotations

from typing import Any

from admission.lane_store import LaneStats


class LaneGauges:
    """Per lane: requests and tokens in the current window, slots in use, paused until, jobs waiting.

    The gauges are created on the first sample, after the worker booted (``prometheus_client`` is in
    multiprocess mode by then); every process reports the same shared Redis state, so ``max`` is kept.
    """

    def __init__(self) -> None:
        self._gauges: dict[str, Any] | None = None

    def _create(self) -> dict[str, Any]:
        import prometheus_client as prom

        def gauge(name: str, text: str) -> Any:
            return prom.Gauge(name, text, ["lane"], multiprocess_mode="max")

        return {
            "requests": gauge("llm_lane_requests", "Requests admitted in the lane's current window."),
            "tokens": gauge("llm_lane_tokens", "Tokens reserved or used in the lane's current window."),
            "slots": gauge("llm_lane_slots_in_use", "Requests of the lane in flight."),
            "paused": gauge("llm_lane_paused_until_seconds", "When the lane's pause ends (Unix time; 0: none)."),
            "waiting": gauge("llm_lane_jobs_waiting", "Jobs waiting in the lane's line."),
        }

    def sample(self, stats: list[LaneStats]) -> None:
        """Set every gauge from the lanes' current stats."""
        if self._gauges is None:
            self._gauges = self._create()
        gauges = self._gauges
        for lane in stats:
            gauges["requests"].labels(lane.label).set(lane.requests)
            gauges["tokens"].labels(lane.label).set(lane.tokens)
            gauges["slots"].labels(lane.label).set(lane.slots)
            gauges["paused"].labels(lane.label).set(lane.paused_until_ms / 1000)
            gauges["waiting"].labels(lane.label).set(lane.waiting)

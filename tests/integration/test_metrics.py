"""Prometheus metrics: off by default; with METRICS_ENABLED the worker serves message and job counters."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx

from actors import enqueue_generation, enqueue_preview
from repositories.store import JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import Reply


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(text: str, name: str, **labels: str) -> float:
    """The summed value of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def test_metrics_count_jobs_tokens_and_latency_after_a_few_jobs(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "METRICS_ENABLED": "true",
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_prom_port": str(port),
        "dramatiq_prom_db": str(tmp_path / "prom"),
    }
    # (fresh queues: the counters must count this test's jobs, not a retry left over by an earlier test)
    with stack.other_workers(1, "metrics", fresh_queues=True, **env):
        # Given three completed generations, one failed one and a preview kept as is
        for _ in range(3):
            key = unique("job")
            stack.server.script_for(key, Reply.ok("a", "b"))
            assert stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key))).status is (
                JobStatus.COMPLETED
            )
        bad = unique("job")
        stack.server.script_for(bad, Reply.error(400))
        stack.wait_for_status(enqueue_generation(user_id="u1", params=params(bad)))
        stack.wait_for_status(enqueue_preview(user_id="u1", title="t", content="short"))

        # When the metrics endpoint is scraped
        def scrape() -> str:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
            except httpx.HTTPError:
                return ""

        text = wait_until(
            lambda: (body := scrape()) and sample(body, "llm_jobs_finished_total", status="failed") >= 1 and body,
            timeout=20,
            what="the job counters on the metrics endpoint",
        )
    # Then Dramatiq's and the job counters have moved
    assert sample(text, "llm_jobs_finished_total", kind="generate", provider="openrouter", status="completed") == 3
    assert sample(text, "llm_jobs_finished_total", kind="generate", status="failed") == 1
    assert sample(text, "llm_jobs_finished_total", kind="preview", status="completed") == 1
    assert sample(text, "llm_tokens_total", type="completion") > 0
    assert sample(text, "llm_cost_total", provider="openrouter") > 0
    assert sample(text, "llm_provider_attempt_seconds_count", outcome="completed") == 3
    assert sample(text, "llm_job_wait_seconds_count", kind="generate") == 4
    assert sample(text, "dramatiq_messages_total", actor_name="generate_llm_response") >= 4


def test_metrics_are_off_by_default(stack: Stack) -> None:
    assert "Prometheus" not in [type(m).__name__ for m in __import__("actors").broker.middleware]

"""Fault 8: a provider whose error text repeats the API key (OpenAI's own 401 does: "Incorrect API key provided").

The configured key, and any other key-shaped string, must appear nowhere: not in the job's ``error``,
``get_job``, ``llm-jobs status --json``, the worker's log, or Redis (where Dramatiq keeps tracebacks in
the message options). The key is echoed in 4xx and 5xx JSON bodies, in plain-text bodies and in
mid-stream errors, on both HTTP providers, by a loopback server; the worker runs on a Redis of its own.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

import actors
from repositories.migrations import upgrade_database
from repositories.store import JobStatus, JobStore, create_store_engine
from settings import Settings
from tests.conftest import unique
from tests.faults.own_redis import OwnRedis
from tests.faults.worker_env import fault_worker_env
from tests.harness import PROJECT_ROOT, WorkerProcess, wait_for_job_status
from tests.loopback import anthropic as anthropic_loopback
from tests.loopback import openrouter as openrouter_loopback
from tests.queues import queue_on

#: Not shaped like any known key, so only the registration of configured secrets can mask it.
CONFIGURED_KEY = "hk" + uuid.uuid4().hex + "Zq"
#: Shaped like an Anthropic key but configured nowhere: only the shape can mask it.
FOREIGN_KEY = "sk-ant-api03-" + uuid.uuid4().hex
ECHO = f"Incorrect API key provided: {CONFIGURED_KEY} (also tried {FOREIGN_KEY})"
RETRIED_ATTEMPTS = 4


def _openrouter_scripts() -> dict[str, list[Any]]:
    reply = openrouter_loopback.Reply
    return {
        "json-401": [reply.error(401, message=ECHO)],
        "json-500": [reply.error(500, message=f"upstream refused Bearer {CONFIGURED_KEY}")] * RETRIED_ATTEMPTS,
        "plain-400": [reply.error(400, message=ECHO, plain_text_body=True)],
        "plain-503": [reply.error(503, message=ECHO, plain_text_body=True)] * RETRIED_ATTEMPTS,
        "mid-401": [reply(error_after_chunks=1, error_code=401, error_message=ECHO)],
        "mid-502": [reply(error_after_chunks=1, error_code=502, error_message=ECHO)] * RETRIED_ATTEMPTS,
    }


def _anthropic_scripts() -> dict[str, list[Any]]:
    reply = anthropic_loopback.Reply
    return {
        "json-401": [reply.error(401, message=ECHO)],
        "json-500": [reply.error(500, message=f"upstream refused x-api-key: {CONFIGURED_KEY}")] * RETRIED_ATTEMPTS,
        "plain-400": [reply.error(400, message=ECHO, plain_text_body=True)],
        "plain-529": [reply.error(529, message=ECHO, plain_text_body=True)] * RETRIED_ATTEMPTS,
        "mid-401": [reply.stream_error("authentication_error", after=1, error_message=ECHO)],
        "mid-overloaded": [reply.stream_error("overloaded_error", after=1, error_message=ECHO)] * RETRIED_ATTEMPTS,
    }


@pytest.fixture(params=["openrouter", "anthropic"])
def provider(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, dict[str, str]]]:
    """A loopback server of the provider, scripted to echo the key, and the worker settings that reach it."""
    if request.param == "openrouter":
        with openrouter_loopback.OpenRouterServer() as server:
            for key, replies in _openrouter_scripts().items():
                server.script_for(key, *replies)
            yield "openrouter", server, {"OPENROUTER_API_KEY": CONFIGURED_KEY}
    else:
        with anthropic_loopback.AnthropicServer() as server:
            for key, replies in _anthropic_scripts().items():
                server.script_for(key, *replies)
            env = {
                "LLM_PROVIDER": "anthropic",
                "ANTHROPIC_BASE_URL": server.base_url,
                "ANTHROPIC_API_KEY": CONFIGURED_KEY,
                "OPENROUTER_API_KEY": "",
            }
            yield "anthropic", server, env


def _redis_values(client: redis.Redis) -> Iterator[Any]:
    """Every key and value in the server, whatever the type (bytes: the client does not decode)."""
    raw: Any = client
    for key in raw.scan_iter(count=500):
        yield key
        kind = raw.type(key)
        if kind == b"string":
            yield raw.get(key) or b""
        elif kind == b"hash":
            yield from (item for pair in raw.hgetall(key).items() for item in pair)
        elif kind == b"list":
            yield from raw.lrange(key, 0, -1)
        elif kind == b"set":
            yield from raw.smembers(key)
        elif kind == b"zset":
            yield from raw.zrange(key, 0, -1)
        elif kind == b"stream":
            for _, fields in raw.xrange(key):
                yield from (item for pair in fields.items() for item in pair)


def test_a_key_echoed_by_the_provider_appears_nowhere(
    provider: tuple[str, Any, dict[str, str]], tmp_path: Path
) -> None:
    name, server, provider_env = provider
    scripts = _openrouter_scripts() if name == "openrouter" else _anthropic_scripts()
    with OwnRedis() as own:
        database_url = f"sqlite:///{tmp_path / 'jobs.db'}"
        engine = create_store_engine(database_url)
        upgrade_database(engine)
        store = JobStore(engine)
        env = fault_worker_env(
            redis_url=own.url, database_url=database_url, provider_url=server.base_url, **provider_env
        )
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        sender = RedisBroker(url=own.url, middleware=[])  # type: ignore[no-untyped-call]
        # Given one job per way of echoing the key
        jobs = {}
        for key in scripts:
            job_id = unique(key)
            jobs[key] = job_id
            params = {"model": "test/model", "messages": [{"role": "user", "content": f"hi [[{key}]]"}]}
            sender.enqueue(
                Message(
                    queue_name="llm_generate",
                    actor_name="generate_llm_response",
                    args=(),
                    kwargs={"job_id": job_id, "user_id": "u1", "params": params},
                    options={},
                )
            )
        try:
            # When every job has failed (the 5xx and mid-stream 5xx ones after all their retries)
            finished = {key: wait_for_job_status(store, job_id, timeout=60) for key, job_id in jobs.items()}
        finally:
            worker.stop()
        # Then the key is masked in every stored error ...
        for key, job in finished.items():
            assert job.status is JobStatus.FAILED, key
            assert job.error is not None
            assert "[redacted]" in job.error, (key, job.error)
            assert CONFIGURED_KEY not in job.error
            assert FOREIGN_KEY not in job.error
        # ... in what get_job returns
        with queue_on(Settings(database_url=database_url, cancel_signals=False)):
            for job_id in jobs.values():
                job = actors.get_job(job_id, user_id="u1")
                assert job is not None
                assert CONFIGURED_KEY not in repr(job)
        # ... in what the operator CLI prints
        cli_env = {**env, "OPENROUTER_API_KEY": CONFIGURED_KEY}
        for job_id in (jobs["json-401"], jobs["plain-400"]):  # one CLI process each: seconds to start
            shown = subprocess.run(
                [sys.executable, "-m", "actors.cli", "status", job_id, "--json"],
                cwd=PROJECT_ROOT,
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert job_id in shown.stdout
            assert CONFIGURED_KEY not in shown.stdout + shown.stderr
            assert FOREIGN_KEY not in shown.stdout + shown.stderr
        # ... in the worker's log
        log = worker.log()
        assert "job failed" in log
        assert CONFIGURED_KEY not in log
        assert FOREIGN_KEY not in log
        # ... and in Redis, tracebacks of the retried attempts included
        values = list(_redis_values(own.client()))
        assert any(b"traceback" in value for value in values), "no retried message left a traceback to check"
        assert not [value for value in values if CONFIGURED_KEY.encode() in value or FOREIGN_KEY.encode() in value]
        sender.close()
        engine.dispose()

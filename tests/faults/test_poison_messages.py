"""Fault 7: an undecodable body in ``dramatiq:llm_generate``, and raw messages the actors cannot take.

A poison body is dead-lettered with a reason and never logged; the valid messages fetched in the same
batch still run. A message with too many positional arguments, ``kwargs`` that is a list, or an
invalid ``retention_days`` is dead-lettered at once, never retried. Each test runs a real worker on a
Redis server of its own.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import update

from repositories.migrations import upgrade_database
from repositories.store import JobKind, JobRow, JobStatus, JobStore, create_store_engine, utcnow
from tests.conftest import unique
from tests.faults.own_redis import OwnRedis
from tests.faults.worker_env import fault_worker_env
from tests.harness import WorkerProcess, wait_for_job_status, wait_until
from tests.loopback.openrouter import OpenRouterServer

POISON_TEXT = "POISON-PROMPT-" + uuid.uuid4().hex


def _store(path: Path) -> tuple[str, JobStore]:
    url = f"sqlite:///{path / 'jobs.db'}"
    engine = create_store_engine(url)
    upgrade_database(engine)
    return url, JobStore(engine)


def _generate(job_id: str, **overrides: Any) -> Message[Any]:
    fields: dict[str, Any] = {
        "queue_name": "llm_generate",
        "actor_name": "generate_llm_response",
        "args": (),
        "kwargs": {
            "job_id": job_id,
            "user_id": "u1",
            "params": {"model": "test/model", "messages": [{"role": "user", "content": "hi"}]},
        },
        "options": {},
    }
    fields.update(overrides)
    return Message(**fields)


def _cleanup(**kwargs: Any) -> Message[Any]:
    return Message(queue_name="llm_control", actor_name="cleanup_old_jobs", args=(), kwargs=kwargs, options={})


def _push_raw(client: redis.Redis, queue: str, body: bytes) -> str:
    """Put a body in a queue the way Dramatiq's enqueue does, whatever the body is."""
    redis_id = str(uuid.uuid4())
    client.hset(f"dramatiq:{queue}.msgs", redis_id, body)
    client.rpush(f"dramatiq:{queue}", redis_id)
    return redis_id


def _dead_letters(client: redis.Redis, queue: str) -> dict[str, bytes]:
    stored = cast(dict[bytes, bytes], client.hgetall(f"dramatiq:{queue}.XQ.msgs"))
    return {key.decode(): value for key, value in stored.items()}


def test_a_poison_body_is_dead_lettered_with_a_reason_and_the_rest_of_its_batch_runs(tmp_path: Path) -> None:
    with OpenRouterServer() as provider, OwnRedis() as own:
        database_url, store = _store(tmp_path)
        client = own.client()
        sender = RedisBroker(url=own.url, middleware=[])  # type: ignore[no-untyped-call]
        # Given one batch: a valid message, a body that is not JSON (with a prompt in it), two valid ones
        job_ids = [unique("valid") for _ in range(3)]
        sender.enqueue(_generate(job_ids[0]))
        poison_id = _push_raw(client, "llm_generate", f'not json {{"prompt": "{POISON_TEXT}"'.encode())
        for job_id in job_ids[1:]:
            sender.enqueue(_generate(job_id))
        # When a worker fetches them together (prefetch = 4 threads)
        env = fault_worker_env(redis_url=own.url, database_url=database_url, provider_url=provider.base_url)
        worker = WorkerProcess(env, tmp_path / "worker.log", threads=4).start()
        try:
            # Then the valid ones complete
            for job_id in job_ids:
                assert wait_for_job_status(store, job_id, timeout=30).status is JobStatus.COMPLETED
            # and the poison body sits in the dead letters with its reason
            wait_until(lambda: poison_id in _dead_letters(client, "llm_generate"), what="the poison body dead-lettered")
            reasons = client.hgetall("dramatiq:llm_generate.XQ.reasons")
            assert reasons[poison_id.encode()] == b"body is not JSON"
            assert not client.hexists("dramatiq:llm_generate.msgs", poison_id)
        finally:
            worker.stop()
        log = worker.log()
        assert POISON_TEXT not in log
        assert "Consumer encountered an unexpected error" not in log
        assert "undecodable message dead-lettered from llm_generate: body is not JSON" in log
        sender.close()
        store.engine.dispose()


def test_raw_messages_the_actors_cannot_take_are_dead_lettered_without_a_retry(tmp_path: Path) -> None:
    with OpenRouterServer() as provider, OwnRedis() as own:
        database_url, store = _store(tmp_path)
        client = own.client()
        sender = RedisBroker(url=own.url, middleware=[])  # type: ignore[no-untyped-call]
        # Given a finished job two days old, which a negative retention would delete
        old_id = unique("old")
        store.create(job_id=old_id, user_id="u1", kind=JobKind.GENERATE, request={})
        store.fail(old_id, error="long ago")
        with store.engine.begin() as connection:
            connection.execute(
                update(JobRow).where(JobRow.job_id == old_id).values(updated_at=utcnow() - timedelta(days=2))
            )
        # and raw messages no actor call can take
        positional_id = unique("positional")
        params = {"model": "test/model", "messages": [{"role": "user", "content": "hi"}]}
        malformed = [
            _generate(positional_id, args=(positional_id, "u1", params, "one too many"), kwargs={}),
            _generate(unique("listed"), kwargs=[["job_id", "x"]]),
            _cleanup(retention_days="abc"),
            Message(
                queue_name="llm_control",
                actor_name="cleanup_old_jobs",
                args=(),
                kwargs={"retention_days": -1},
                options={},
            ),
        ]
        ids = {message.message_id for message in malformed}
        for message in malformed:
            sender.enqueue(message)
        env = fault_worker_env(redis_url=own.url, database_url=database_url, provider_url=provider.base_url)
        worker = WorkerProcess(env, tmp_path / "worker.log", threads=4).start()
        try:
            # When the worker has dead-lettered all four
            def dead() -> list[dict[str, Any]]:
                bodies = [
                    *_dead_letters(client, "llm_generate").values(),
                    *_dead_letters(client, "llm_control").values(),
                ]
                found = [json.loads(body) for body in bodies]
                return found if {item["message_id"] for item in found} >= ids else []

            dead_letters = wait_until(dead, timeout=30, what="the malformed messages dead-lettered")
        finally:
            worker.stop()
        # Then none was retried, the job that could be named failed with the reason, and nothing was deleted
        assert all(item["options"].get("retries", 0) == 0 for item in dead_letters)
        assert "Retrying message" not in worker.log()
        failed = store.get(positional_id)
        assert failed is not None
        assert failed.status is JobStatus.FAILED
        assert failed.error is not None
        assert "too many positional arguments" in failed.error
        assert store.get(old_id) is not None
        sender.close()
        store.engine.dispose()

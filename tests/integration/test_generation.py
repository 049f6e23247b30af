"""End to end: web code enqueues, a real worker streams from the loopback provider, the store has the answer."""

from __future__ import annotations

from datetime import timedelta

from actors import enqueue_generation, generate_llm_response, get_job
from actors.api import resend_unsent
from repositories.store import JobKind, JobStatus, utcnow
from tests.conftest import TEST_API_KEY, unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import USAGE_COST, Reply


def test_a_generation_completes_with_content_and_usage(stack: Stack) -> None:
    # Given a provider that streams three pieces, keep-alive comments and a usage chunk
    key = unique("job")
    stack.server.script_for(key, Reply.ok("Hello", ", ", "world"))
    # When web code enqueues a generation
    job_id = enqueue_generation(user_id="u1", params=params(key, temperature=0.2, max_tokens=50), job_id=key)
    job = stack.wait_for_status(job_id)
    # Then it completes with the whole text and the provider's usage
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "Hello, world"
    assert job.attempts == 1
    assert job.response is not None
    assert job.response["content"] == "Hello, world"
    assert job.response["provider"] == "openrouter"
    assert job.response["model"] == "test/model"
    assert job.response["finish_reason"] == "stop"
    assert job.response["usage"]["total_tokens"] == (
        job.response["usage"]["prompt_tokens"] + job.response["usage"]["completion_tokens"]
    )
    assert job.response["usage"]["completion_tokens"] > 0
    assert job.response["cost"] == USAGE_COST


def test_the_provider_receives_the_params_streaming_and_the_key(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("ok"))
    job_id = enqueue_generation(user_id="u1", params=params(key, temperature=0.2, stop=["\n"]), job_id=key)
    stack.wait_for_status(job_id)
    request = stack.server.requests_for(key)[0]
    assert request.path.endswith("/chat/completions")
    assert request.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["temperature"] == 0.2
    assert request.body["stop"] == ["\n"]
    assert "top_p" not in request.body


def test_a_stream_without_usage_counts_nothing(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("plain", usage=False))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.COMPLETED
    assert job.response is not None
    assert job.response["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_content_grows_in_the_store_while_the_stream_runs(stack: Stack) -> None:
    # Given a provider streaming one piece every 150 ms
    key = unique("job")
    pieces = [f"w{i} " for i in range(20)]
    stack.server.script_for(key, Reply.ok(*pieces, chunk_delay_s=0.15))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    # When the web app polls the job
    seen: list[str] = []

    def partial_seen() -> bool:
        job = get_job(job_id, user_id="u1")
        growing = job is not None and job.status is JobStatus.PROCESSING and job.content
        if growing and job is not None and (not seen or seen[-1] != job.content):
            seen.append(job.content)
        return len(seen) >= 3

    wait_until(partial_seen, timeout=10, what="three growing partial texts")
    # Then it sees the text grow while processing, each a prefix of the final answer
    job = stack.wait_for_status(job_id)
    assert job.content == "".join(pieces)
    assert all(job.content.startswith(partial) for partial in seen)
    assert len(seen[0]) < len(seen[-1]) < len(job.content)


def test_web_code_may_send_the_actor_directly(stack: Stack) -> None:
    # Given no row in the store
    key = unique("job")
    stack.server.script_for(key, Reply.ok("direct"))
    # When web code calls actor.send() itself
    generate_llm_response.send(job_id=key, user_id="u9", params=params(key))
    # Then the worker creates the row and completes it
    job = stack.wait_for_status(key)
    assert job.status is JobStatus.COMPLETED
    assert job.user_id == "u9"
    assert job.content == "direct"


def test_the_same_job_id_enqueued_twice_is_one_job_and_one_provider_call(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("once", chunk_delay_s=0.1))
    first = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    second = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    assert first == second == key
    stack.wait_for_status(key)
    # A third call after completion does not run it again either
    enqueue_generation(user_id="u1", params=params(key), job_id=key)
    generate_llm_response.send(job_id=key, user_id="u1", params=params(key))
    marker = unique("after")
    stack.server.script_for(marker, Reply.ok("later"))
    stack.wait_for_status(enqueue_generation(user_id="u1", params=params(marker)))
    assert len(stack.server.requests_for(key)) == 1


def test_get_job_hides_other_users_jobs(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("mine"))
    job_id = enqueue_generation(user_id="owner", params=params(key), job_id=key)
    stack.wait_for_status(job_id)
    assert get_job(job_id, user_id="someone-else") is None
    assert get_job(unique("unknown")) is None
    job = get_job(job_id, user_id="owner")
    assert job is not None
    assert job.kind == "generate"


def test_no_key_reaches_the_log_or_the_store(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.error(401, message="No auth credentials found"))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.FAILED
    assert TEST_API_KEY not in (job.error or "")
    assert TEST_API_KEY not in repr(job)
    assert TEST_API_KEY not in stack.worker.log()


def test_no_prompt_reaches_the_worker_log(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.error(503), Reply.error(400, message="bad"))
    params_with_secret = params(key)
    params_with_secret["messages"][0]["content"] += " PRIVATE-DIARY-ENTRY"
    stack.wait_for_status(enqueue_generation(user_id="u1", params=params_with_secret, job_id=key))
    assert "PRIVATE-DIARY-ENTRY" not in stack.worker.log()


def test_a_job_whose_sender_died_before_sending_is_sent_by_the_sweep(stack: Stack) -> None:
    # Given a pending row whose web process died before it could send the message
    key = unique("job")
    stack.server.script_for(key, Reply.ok("rescued"))
    two_minutes_ago = utcnow() - timedelta(minutes=2)
    stack.store.create(job_id=key, user_id="u1", kind=JobKind.GENERATE, request=params(key), now=two_minutes_ago)
    # When the scheduler's sweep runs
    assert resend_unsent() >= 1
    # Then the job runs, once
    job = stack.wait_for_status(key)
    assert job.status is JobStatus.COMPLETED
    assert job.content == "rescued"
    resend_unsent()
    stack.wait_until_no_message_for(key)
    assert len(stack.server.requests_for(key)) == 1


def test_a_row_created_by_the_worker_is_never_resent(stack: Stack) -> None:
    # Given a job sent by web code straight to the actor, failing once with a long Retry-After
    key = unique("job")
    stack.server.script_for(key, Reply.error(503, retry_after="3"), Reply.ok("after the wait"))
    generate_llm_response.send(job_id=key, user_id="u1", params=params(key))
    wait_until(lambda: (job := stack.store.get(key)) and job.status is JobStatus.PENDING and job.attempts == 1)
    # When the sweep runs while it waits for its retry / Then it is not sent again early
    assert key not in [job.job_id for job in stack.store.unsent_before(utcnow() + timedelta(minutes=5))]
    # And its own retry still completes it, once (nor is it left behind for a later test's worker)
    assert stack.wait_for_status(key).status is JobStatus.COMPLETED
    stack.wait_until_no_message_for(key)
    assert len(stack.server.requests_for(key)) == 2

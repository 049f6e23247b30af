"""The lane scripts against real Redis: limits, reservations settled to usage, pause and probe, round-robin, leases."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import dramatiq
import pytest
import redis

from actors.queue import current
from actors.reconciler import Reconciler
from admission.lane_store import KEEP_RESERVATION, NOT_SENT, Admission, RedisLaneStore
from admission.lanes import Lane, LaneBook, LaneConfig, estimate_prompt_tokens, key_identity, parse_lanes
from admission.messages import parked_entry
from repositories.store import JobStore
from tests.conftest import TEST_REDIS_URL

LEASE_MS = 30_000


@pytest.fixture
def store() -> Iterator[RedisLaneStore]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    prefix = f"test-lanes-{uuid.uuid4().hex[:8]}:"
    yield RedisLaneStore(client, prefix=prefix)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def lane(**limits: object) -> Lane:
    config = LaneConfig.model_validate({"provider": "openrouter", **limits})
    return Lane(f"openrouter|abc|{uuid.uuid4().hex[:6]}", "openrouter", "abc", "*", config)


def entry(message_id: str) -> bytes:
    return message_id.encode() + b'\n{"message_id": "' + message_id.encode() + b'"}'


def admit(
    store: RedisLaneStore,
    target: Lane,
    holder: str,
    *,
    user: str = "u1",
    tokens: int = 10,
    park: bool = True,
    handoff: str | None = None,
    since: int | None = None,
) -> Admission:
    return store.admit(
        target,
        holder=holder,
        user_id=user,
        reserve_tokens=tokens,
        prompt_tokens=min(tokens, 4),
        lease_ms=LEASE_MS,
        parked_entry=entry(holder) if park else None,
        waiting_since_ms=since if since is not None else int(time.time() * 1000),
        handoff=handoff,
    )


def test_concurrency_limit_parks_the_third_and_hands_it_the_freed_slot(store: RedisLaneStore) -> None:
    target = lane(concurrent=2)
    assert admit(store, target, "a").admitted
    assert admit(store, target, "b").admitted
    third = admit(store, target, "c")
    assert not third.admitted
    assert third.reason == "concurrency"
    handed = store.release(target, "a", settle_tokens=5, lease_ms=LEASE_MS).handoffs
    assert handed == [entry("c")]
    # the handed message takes over the slot reserved under its id
    assert admit(store, target, "c-token", handoff="c").reason == "handoff"
    assert store.stats(target).slots == 2


def test_requests_per_window_count_every_admission_and_tokens_settle_to_usage(store: RedisLaneStore) -> None:
    target = lane(requests_per_minute=3, tokens_per_minute=100)
    assert admit(store, target, "a", tokens=60).admitted
    assert admit(store, target, "b", tokens=50).reason == "tokens"  # 60 + 50 > 100
    handed = store.release(target, "a", settle_tokens=20, lease_ms=LEASE_MS).handoffs  # used 20 of 60
    assert handed == [entry("b")]
    stats = store.stats(target)
    assert (stats.requests, stats.tokens) == (2, 70)
    assert admit(store, target, "c", tokens=1, park=False).admitted
    assert admit(store, target, "d", tokens=1, park=False).reason == "requests"


def test_a_message_not_sent_gives_back_its_request_and_tokens(store: RedisLaneStore) -> None:
    target = lane(requests_per_minute=1)
    assert admit(store, target, "a").admitted
    store.release(target, "a", settle_tokens=NOT_SENT, lease_ms=LEASE_MS)
    assert store.stats(target).requests == 0
    assert admit(store, target, "b", park=False).admitted


def test_the_window_slides(store: RedisLaneStore) -> None:
    target = lane(requests_per_minute=1, window_s=1, margin_ms=0)
    assert admit(store, target, "a", park=False).admitted
    store.release(target, "a", settle_tokens=1, lease_ms=LEASE_MS)
    assert admit(store, target, "b", park=False).reason == "requests"
    time.sleep(1.05)
    assert admit(store, target, "b", park=False).admitted


def test_a_pause_parks_everyone_then_exactly_one_probe_goes_first(store: RedisLaneStore) -> None:
    target = lane(concurrent=10)
    assert admit(store, target, "a").admitted
    until = store.pause(target, holder="a", retry_after_s=0.3, lease_ms=LEASE_MS, reason="429")
    assert until > time.time() * 1000
    store.release(target, "a", settle_tokens=0, lease_ms=LEASE_MS)
    for name in ("b", "c", "d"):
        assert admit(store, target, name).reason == "paused"
    assert store.release(target, None, settle_tokens=KEEP_RESERVATION, lease_ms=LEASE_MS).handoffs == []
    time.sleep(0.35)
    # the pause is over: one sweep hands out exactly one probe, however many sweeps run
    first = store.release(target, None, settle_tokens=KEEP_RESERVATION, lease_ms=LEASE_MS).handoffs
    second = store.release(target, None, settle_tokens=KEEP_RESERVATION, lease_ms=LEASE_MS).handoffs
    assert first == [entry("b")]
    assert second == []
    assert admit(store, target, "e").reason == "probing"
    # the probe succeeds: the others follow
    assert admit(store, target, "b-token", handoff="b").admitted
    rest = store.release(target, "b-token", settle_tokens=3, lease_ms=LEASE_MS).handoffs
    assert sorted(rest) == sorted([entry("c"), entry("d"), entry("e")])


def test_a_probe_that_was_never_sent_hands_the_probe_to_the_next_waiting_message(store: RedisLaneStore) -> None:
    target = lane()
    assert admit(store, target, "a").admitted
    store.pause(target, holder="a", retry_after_s=0.2, lease_ms=LEASE_MS, reason="429")
    store.release(target, "a", settle_tokens=0, lease_ms=LEASE_MS)
    admit(store, target, "b")
    admit(store, target, "c")
    time.sleep(0.25)
    assert store.release(target, None, settle_tokens=KEEP_RESERVATION, lease_ms=LEASE_MS).handoffs == [entry("b")]
    # When the handed probe is skipped before it is sent (its user is at its own limit, say)
    handed = store.release(target, "b", settle_tokens=NOT_SENT, lease_ms=LEASE_MS).handoffs
    # Then the lane is still probing, and the next message is the one probe
    assert handed == [entry("c")]
    assert store.stats(target).probing
    assert admit(store, target, "d", park=False).reason == "probing"


def test_a_probe_that_gets_another_429_pauses_again_with_backoff(store: RedisLaneStore) -> None:
    target = lane(pause_s=0.2, max_pause_s=10)
    assert admit(store, target, "a").admitted
    first = store.pause(target, holder="a", retry_after_s=None, lease_ms=LEASE_MS, reason="429")
    store.release(target, "a", settle_tokens=0, lease_ms=LEASE_MS)
    time.sleep(0.25)
    assert admit(store, target, "probe").reason == "probe"
    start = time.time() * 1000
    second = store.pause(target, holder="probe", retry_after_s=None, lease_ms=LEASE_MS, reason="429")
    assert second - start >= 390  # doubled: 0.4 s
    assert second > first
    store.release(target, "probe", settle_tokens=0, lease_ms=LEASE_MS)
    assert admit(store, target, "x", park=False).reason == "paused"


def test_waiting_messages_are_admitted_round_robin_across_users(store: RedisLaneStore) -> None:
    target = lane(concurrent=1)
    assert admit(store, target, "run", user="heavy").admitted
    for index in range(5):
        admit(store, target, f"h{index}", user="heavy")
    admit(store, target, "l0", user="light")
    order = []
    holder = "run"
    for _ in range(3):
        handed = store.release(target, holder, settle_tokens=1, lease_ms=LEASE_MS).handoffs
        (next_entry,) = handed
        holder = next_entry.split(b"\n")[0].decode()
        order.append(holder)
    assert order == ["h0", "l0", "h1"]


def test_a_dead_holders_slot_and_answer_reservation_come_back_when_its_lease_expires(store: RedisLaneStore) -> None:
    target = lane(concurrent=1, tokens_per_minute=1000)
    assert store.admit(
        target,
        holder="dead",
        user_id="u",
        reserve_tokens=900,
        prompt_tokens=100,
        lease_ms=1000,
        parked_entry=None,
        waiting_since_ms=0,
    ).admitted
    assert admit(store, target, "next", park=False).reason == "concurrency"
    time.sleep(1.05)
    stats = store.stats(target)
    assert (stats.slots, stats.tokens) == (0, 100)  # only its prompt estimate stays counted
    assert admit(store, target, "next", park=False).admitted


def test_entries_waiting_longer_than_the_maximum_are_taken_out(store: RedisLaneStore) -> None:
    target = lane(concurrent=1)
    assert admit(store, target, "run").admitted
    admit(store, target, "old", since=1)
    admit(store, target, "new")
    assert store.expired_waiting(target, older_than_ms=60_000, lease_ms=LEASE_MS) == [entry("old")]
    assert store.stats(target).waiting == 1


def test_lane_settings_parse_and_name_the_bad_field() -> None:
    lanes = parse_lanes('[{"provider": "openrouter", "requests_per_minute": 120, "tokens_per_minute": 30000}]')
    assert lanes[0].requests_per_minute == 120
    assert lanes[0].model == "*"
    with pytest.raises(ValueError, match="requests_per_minute"):
        parse_lanes('[{"provider": "openrouter", "requests_per_minute": 0}]')
    with pytest.raises(ValueError, match="JSON"):
        parse_lanes("[{")
    with pytest.raises(ValueError, match="provider"):
        parse_lanes('[{"provider": "nope"}]')


def test_a_lane_is_named_by_a_hash_of_the_key_and_the_model_lane_wins_over_star() -> None:
    book = LaneBook(
        parse_lanes('[{"provider": "openrouter"}, {"provider": "openrouter", "model": "big", "concurrent": 1}]'),
        keys={"openrouter": "sk-secret-key"},
    )
    big, other = book.lane_for("openrouter", "big"), book.lane_for("openrouter", "small")
    assert big is not None
    assert other is not None
    assert big.model == "big"
    assert other.model == "*"
    assert "sk-secret" not in big.lane_id
    assert key_identity("sk-secret-key") in big.lane_id
    assert book.lane_for("anthropic", "big") is None
    assert LaneBook(parse_lanes('[{"provider": "claude-agent-sdk"}]'), keys={}).lane_for("claude-agent-sdk", "m")


def test_the_prompt_estimate_is_chars_over_four_plus_framing() -> None:
    assert estimate_prompt_tokens(["a" * 400]) == 100 + 8


def test_a_request_counts_in_its_window_from_when_it_is_sent(store: RedisLaneStore) -> None:
    target = lane(requests_per_minute=1, window_s=1, margin_ms=0)
    assert admit(store, target, "a", park=False).admitted
    time.sleep(0.6)
    assert store.sending(target, "a", lease_ms=LEASE_MS) == 0
    store.release(target, "a", settle_tokens=1, lease_ms=LEASE_MS)
    time.sleep(0.5)  # 1.1 s after admission, 0.5 s after it was sent
    assert admit(store, target, "b", park=False).reason == "requests"


def test_a_request_admitted_before_a_pause_is_held_back_when_it_would_leave(store: RedisLaneStore) -> None:
    target = lane()
    assert admit(store, target, "a", park=False).admitted
    assert admit(store, target, "b", park=False).admitted
    until = store.pause(target, holder="a", retry_after_s=5, lease_ms=LEASE_MS, reason="429")
    assert store.sending(target, "b", lease_ms=LEASE_MS) == until


def test_a_full_window_says_when_its_oldest_request_leaves_it(store: RedisLaneStore) -> None:
    target = lane(requests_per_minute=1, window_s=2, margin_ms=0)
    assert admit(store, target, "a").admitted
    admit(store, target, "b")
    released = store.release(target, "a", settle_tokens=1, lease_ms=LEASE_MS)
    assert released.handoffs == []
    assert 1900 < released.next_free_ms - time.time() * 1000 <= 2001


def test_the_reconciler_reads_the_job_ids_of_messages_in_a_lane_line_or_handed_off(store: RedisLaneStore) -> None:
    def job_entry(job_id: str) -> tuple[str, bytes]:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name="default",
            actor_name="generate_llm_response",
            args=(),
            kwargs={"job_id": job_id, "user_id": f"user-{job_id}"},
            options={},
        )
        return message.message_id, parked_entry(message)

    def live(lanes: RedisLaneStore | None) -> set[str]:
        reconciler = Reconciler(
            store=cast(JobStore, None),  # live_job_ids reads Redis only
            broker=current().broker,
            leases=None,
            lanes=lanes,
            lease_s=15,
            pending_after_s=60,
            send=lambda job, delay_ms: None,
        )
        return reconciler.live_job_ids()

    target = lane(concurrent=1)
    first, second = f"job-{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:8]}"
    assert admit(store, target, "running", park=False).admitted
    # Given two jobs' messages parked in the full lane's line (two users)
    (first_id, first_entry), (_, second_entry) = job_entry(first), job_entry(second)
    for job_id, parked in ((first, first_entry), (second, second_entry)):
        result = store.admit(
            target,
            holder=f"token-{job_id}",
            user_id=f"user-{job_id}",
            reserve_tokens=10,
            prompt_tokens=4,
            lease_ms=LEASE_MS,
            parked_entry=parked,
            waiting_since_ms=int(time.time() * 1000),
        )
        assert not result.admitted
    # Then the reconciler sees both (and without the lane store, neither)
    assert {first, second} <= live(store)
    assert not {first, second} & live(None)
    # When the slot frees, the first is handed off: in the handoffs hash until its process enqueued it
    assert store.release(target, "running", settle_tokens=5, lease_ms=LEASE_MS).handoffs == [first_entry]
    assert {first, second} <= live(store)
    # And once confirmed enqueued (here: never), only the one still in line is left
    store.handed_off(first_id)
    found = live(store)
    assert second in found
    assert first not in found

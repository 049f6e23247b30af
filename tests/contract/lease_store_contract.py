"""The lease-store contract: every ``LeaseStore`` backend passes the same cases.

A tier runs them by subclassing ``LeaseStoreContract`` with a ``lease_store`` fixture made by
``lease_store_fixture(*backends)`` (a fixture parametrized over the backends, as Dramatiq's own
``rate_limiter_backend`` fixture is): ``tests/unit`` runs ``memory`` (no Redis there), and
``tests/integration`` runs ``redis`` (db 15 of the test Redis, a namespace of the test's own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from admission.leases import LeaseStore, MemoryLeaseStore, Parked, RedisLeaseStore, UserLoad
from tests.conftest import TEST_REDIS_URL, unique

BACKENDS = ("memory", "redis")

LEASE_MS = 10_000


def _open(backend: str) -> Iterator[LeaseStore]:
    if backend == "memory":
        yield MemoryLeaseStore()
        return
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    namespace = unique("lease-contract")
    try:
        yield RedisLeaseStore(client, namespace=namespace)
    finally:
        for key in client.scan_iter(match=f"{namespace}:*", count=500):
            client.delete(key)
        client.close()


def lease_store_fixture(*backends: str) -> Callable[..., Any]:
    """A ``lease_store`` fixture parametrized over ``backends`` (``memory``, ``redis``)."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown lease-store backends: {sorted(unknown)}")

    @pytest.fixture(params=backends)
    def lease_store(request: pytest.FixtureRequest) -> Iterator[LeaseStore]:
        yield from _open(request.param)

    return lease_store


def entry(entry_id: str) -> Parked:
    """A parked entry with a recognisable body."""
    return Parked(entry_id, f"body of {entry_id}".encode())


def _acquire(store: LeaseStore, holder: str, *, park: str | None = None, key: str = "a:u", limit: int = 1) -> bool:
    return store.acquire(key, holder, limit=limit, lease_ms=LEASE_MS, park=entry(park) if park else None)


class LeaseStoreContract:
    """The cases; a subclass named ``Test...`` in a tier provides the ``lease_store`` fixture."""

    def test_slots_up_to_the_limit_then_parks_and_a_holder_keeps_its_own(self, lease_store: LeaseStore) -> None:
        assert _acquire(lease_store, "h1", park="j1", limit=2)
        assert _acquire(lease_store, "h2", park="j2", limit=2)
        assert _acquire(lease_store, "h1", park="j1", limit=2)  # the same holder again: its slot, no second one
        assert not _acquire(lease_store, "h3", park="j3", limit=2)
        assert not _acquire(lease_store, "h4", limit=2)  # refused without parking
        assert lease_store.loads() == [UserLoad("a", "u", running=2, waiting=1)]
        assert lease_store.parked("a:u") == [entry("j3")]
        assert lease_store.parked_keys() == {"a:u": 2}

    def test_a_released_slot_goes_to_the_oldest_parked_entry_once(self, lease_store: LeaseStore) -> None:
        assert _acquire(lease_store, "h1")
        assert not _acquire(lease_store, "h2", park="j2")
        assert not _acquire(lease_store, "h3", park="j3")
        assert lease_store.release("a:u", "h1", limit=1, lease_ms=LEASE_MS) == [entry("j2")]
        assert lease_store.loads() == [UserLoad("a", "u", running=1, waiting=1)]
        # The handed-off message comes back with a new holder and takes the slot handed to its entry id
        assert lease_store.acquire("a:u", "h2-again", limit=1, lease_ms=LEASE_MS, handoff="j2")
        # A second delivery of it finds the handoff gone and competes like any other
        assert not lease_store.acquire("a:u", "h2-dup", limit=1, lease_ms=LEASE_MS, handoff="j2")
        assert lease_store.release("a:u", "h2-again", limit=1, lease_ms=LEASE_MS) == [entry("j3")]

    def test_an_entry_already_in_line_is_not_parked_twice(self, lease_store: LeaseStore) -> None:
        assert _acquire(lease_store, "h1")
        assert not _acquire(lease_store, "h2", park="j2")
        assert not lease_store.acquire("a:u", "h2b", limit=1, lease_ms=LEASE_MS, park=Parked("j2", b"another copy"))
        assert lease_store.park_behind("a:u", Parked("j2", b"a third copy"))
        assert lease_store.parked("a:u") == [entry("j2")]
        assert lease_store.loads() == [UserLoad("a", "u", running=1, waiting=1)]

    def test_park_behind_joins_an_existing_line_only(self, lease_store: LeaseStore) -> None:
        assert not lease_store.park_behind("a:u", entry("j0"))
        assert lease_store.loads() == []
        assert lease_store.parked_keys() == {}
        assert _acquire(lease_store, "h1")
        assert not lease_store.park_behind("a:u", entry("j0"))  # full, but nobody waits: the worker decides
        assert not _acquire(lease_store, "h2", park="j2")
        assert lease_store.park_behind("a:u", entry("j3"))
        assert not lease_store.park_behind("a:other", entry("j4"))
        assert lease_store.parked("a:u") == [entry("j2"), entry("j3")]

    def test_take_out_removes_an_entry_in_one_call_by_its_id(self, lease_store: LeaseStore) -> None:
        assert _acquire(lease_store, "h1")
        for job in ("j2", "j3", "j4"):
            assert not _acquire(lease_store, f"h-{job}", park=job)
        assert lease_store.take_out("j3")
        assert not lease_store.take_out("j3")
        assert not lease_store.take_out("never-parked")
        assert lease_store.parked("a:u") == [entry("j2"), entry("j4")]
        assert lease_store.release("a:u", "h1", limit=1, lease_ms=LEASE_MS) == [entry("j2")]
        assert not lease_store.take_out("j2")  # handed off meanwhile: no longer in line
        assert lease_store.take_out("j4")
        assert lease_store.parked_keys() == {}
        assert lease_store.loads() == [UserLoad("a", "u", running=1, waiting=0)]

    def test_a_drained_line_leaves_no_parked_key(self, lease_store: LeaseStore) -> None:
        assert _acquire(lease_store, "h1", key="a:u")
        assert not _acquire(lease_store, "h2", park="j2", key="a:u")
        assert _acquire(lease_store, "h3", key="b:v", limit=3)
        assert lease_store.parked_keys() == {"a:u": 1}
        assert lease_store.release("a:u", "h1", limit=1, lease_ms=LEASE_MS) == [entry("j2")]
        assert lease_store.parked_keys() == {}
        assert lease_store.parked("a:u") == []
        assert lease_store.loads() == [UserLoad("a", "u", 1, 0), UserLoad("b", "v", 1, 0)]

    def test_a_sweep_release_without_holder_hands_expired_slots_on(self, lease_store: LeaseStore) -> None:
        assert lease_store.acquire("a:u", "dead", limit=1, lease_ms=50, park=None)
        assert not lease_store.acquire("a:u", "h2", limit=1, lease_ms=50, park=entry("j2"))
        deadline = time.monotonic() + 5
        handed: list[Parked] = []
        while not handed and time.monotonic() < deadline:
            handed = lease_store.release("a:u", None, limit=1, lease_ms=LEASE_MS)
            time.sleep(0.01)  # polling the store as the maintenance sweep does
        assert handed == [entry("j2")]

    def test_an_expired_lease_frees_its_slot_and_a_renewed_one_does_not(self, lease_store: LeaseStore) -> None:
        assert lease_store.acquire("a:u", "dead", limit=1, lease_ms=100, park=None)
        assert lease_store.acquire("a:v", "alive", limit=1, lease_ms=100, park=None)
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            lease_store.renew([("a:v", "alive")], lease_ms=100)
            time.sleep(0.02)  # a running job renewing its lease periodically
        assert lease_store.acquire("a:u", "new", limit=1, lease_ms=LEASE_MS, park=None)
        assert not lease_store.acquire("a:v", "intruder", limit=1, lease_ms=LEASE_MS, park=None)

    def test_renew_does_not_bring_an_expired_lease_back_but_recreate_does(self, lease_store: LeaseStore) -> None:
        assert lease_store.acquire("a:u", "gone", limit=1, lease_ms=50, park=None)
        deadline = time.monotonic() + 5
        while lease_store.loads() and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for the lease to expire
        lease_store.renew([("a:u", "gone")], lease_ms=LEASE_MS)
        assert lease_store.loads() == []
        lease_store.renew([("a:u", "gone"), ("a:w", "lost")], lease_ms=LEASE_MS, recreate=True)
        assert lease_store.loads() == [UserLoad("a", "u", 1, 0), UserLoad("a", "w", 1, 0)]
        assert not lease_store.acquire("a:u", "other", limit=1, lease_ms=LEASE_MS, park=None)

    def test_a_handoff_keeps_a_safety_copy_until_confirmed(self, lease_store: LeaseStore) -> None:
        assert _acquire(lease_store, "h1")
        assert not _acquire(lease_store, "h2", park="j2")
        assert not _acquire(lease_store, "h3", park="j3")
        assert lease_store.release("a:u", "h1", limit=1, lease_ms=LEASE_MS) == [entry("j2")]
        assert lease_store.stale_handoffs(older_than_ms=60_000) == []
        assert lease_store.stale_handoffs(older_than_ms=-1) == [entry("j2")]
        lease_store.handed_off("j2")
        assert lease_store.stale_handoffs(older_than_ms=-1) == []

    def test_the_epoch_is_stable_while_the_backend_keeps_its_state(self, lease_store: LeaseStore) -> None:
        first = lease_store.epoch()
        assert first
        assert lease_store.epoch() == first

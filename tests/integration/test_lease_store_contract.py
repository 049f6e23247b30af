"""The lease-store contract on the Redis backend (``tests/unit`` runs it in memory)."""

from __future__ import annotations

from tests.contract.lease_store_contract import LeaseStoreContract, lease_store_fixture

lease_store = lease_store_fixture("redis")


class TestRedisLeaseStore(LeaseStoreContract):
    """Every contract case, on ``RedisLeaseStore`` (db 15 of the test Redis, a namespace of its own)."""

"""The lease-store contract on the memory backend (``tests/integration`` runs it on Redis)."""

from __future__ import annotations

from tests.contract.lease_store_contract import LeaseStoreContract, lease_store_fixture

lease_store = lease_store_fixture("memory")


class TestMemoryLeaseStore(LeaseStoreContract):
    """Every contract case, on ``MemoryLeaseStore``."""

"""Moved to ``admission`` (issue 10): ``admission.limits`` (the limit kinds, ``StartRateGate``) and
``admission.leases`` (``LeaseStore``, ``RedisLeaseStore``, ``MemoryLeaseStore``). A re-export shim
for the call sites not switched yet; delete it once none import it."""

from __future__ import annotations

from admission.leases import LeaseStore, MemoryLeaseStore, Parked, RedisLeaseStore, UserLoad, now_ms
from admission.limits import BucketLimit, ConcurrencyLimit, StartRateGate, UserLimit, WindowLimit
from admission.messages import split_entry

__all__ = [
    "BucketLimit",
    "ConcurrencyLimit",
    "LeaseStore",
    "MemoryLeaseStore",
    "Parked",
    "RedisLeaseStore",
    "StartRateGate",
    "UserLimit",
    "UserLoad",
    "WindowLimit",
    "now_ms",
    "split_entry",
]

"""Moved to ``admission`` (issue 10): ``admission.user_admission.UserAdmission`` (the service the API and
the middleware share) and ``admission.throttle.UserThrottle(admission)`` (the middleware's hooks).

A shim for the call sites not switched yet: ``UserThrottle(leases=..., gate=..., lease_ms=...,
on_waiting=...)`` builds its own ``UserAdmission`` with the default key function ``admission.keys.job_key``;
``throttle_of(broker)`` finds it (or a view on a new-style throttle's admission) with the old API:
``park_behind_backlog``, ``drop_parked``, ``loads``, ``leases``. Delete it once none import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq

from admission import throttle as _admission_throttle
from admission.keys import KeyOf, job_key
from admission.leases import LeaseStore, UserLoad
from admission.limits import StartRateGate
from admission.messages import holder_of, parked_entry
from admission.user_admission import UserAdmission

__all__ = ["LegacyThrottleApi", "UserThrottle", "holder_of", "parked_entry", "throttle_of", "user_of"]


def user_of(message: Any) -> str | None:
    """The ``user_id`` of a message, as ``admission.keys.job_key`` reads it."""
    key = job_key(message)
    return key.user_id if key is not None else None


class LegacyThrottleApi:
    """The sending-side methods the API called on the throttle before issue 10, on ``self.admission``."""

    admission: UserAdmission

    @property
    def leases(self) -> LeaseStore:
        """The admission's lease store."""
        return self.admission.leases

    def park_behind_backlog(self, broker: dramatiq.Broker, message: Any) -> bool:
        """``UserAdmission.park_behind_backlog``."""
        return self.admission.park_behind_backlog(broker, message)

    def drop_parked(self, broker: dramatiq.Broker, job_id: str, user_id: str) -> int:
        """``UserAdmission.take_out(job_id)``: 1 when it was parked, else 0 (the user is no longer needed)."""
        del broker, user_id
        return int(self.admission.take_out(job_id))

    def loads(self) -> list[UserLoad]:
        """``UserAdmission.loads``."""
        return self.admission.loads()


class _AdmissionView(LegacyThrottleApi):
    def __init__(self, admission: UserAdmission) -> None:
        self.admission = admission


class UserThrottle(LegacyThrottleApi, _admission_throttle.UserThrottle):
    """``admission.throttle.UserThrottle`` with the old constructor and the old sending-side methods."""

    def __init__(
        self,
        admission: UserAdmission | None = None,
        *,
        leases: LeaseStore | None = None,
        gate: StartRateGate | None = None,
        lease_ms: int = 30_000,
        sweep_interval_ms: int = 2_000,
        on_waiting: Callable[[dict[str, int]], None] | None = None,
        key_of: KeyOf = job_key,
    ) -> None:
        if admission is None:
            if leases is None:
                raise TypeError("UserThrottle needs an admission or leases")
            admission = UserAdmission(
                leases=leases,
                key_of=key_of,
                gate=gate,
                lease_ms=lease_ms,
                sweep_interval_ms=sweep_interval_ms,
                on_waiting=on_waiting,
            )
        super().__init__(admission)

    def park_behind_backlog(self, broker: dramatiq.Broker, message: Any) -> bool:
        """``UserAdmission.park_behind_backlog`` (defined here too: ``bench/throttle.py`` wraps it on this class)."""
        return self.admission.park_behind_backlog(broker, message)

    @property
    def BACKEND_DOWN_DELAY_MS(self) -> int:  # the old class constant, now admission's setting
        """``UserAdmission.backend_down_delay_ms``."""
        return self.admission.backend_down_delay_ms

    @BACKEND_DOWN_DELAY_MS.setter
    def BACKEND_DOWN_DELAY_MS(self, value: int) -> None:
        self.admission.backend_down_delay_ms = value


def throttle_of(broker: dramatiq.Broker) -> LegacyThrottleApi | None:
    """The broker's throttle with the old sending-side API, if it has one."""
    found = next((m for m in broker.middleware if isinstance(m, _admission_throttle.UserThrottle)), None)
    if found is None:
        return None
    if isinstance(found, LegacyThrottleApi):
        return found
    return _AdmissionView(found.admission)

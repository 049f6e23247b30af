"""Admission: what decides whether a job may start now, shared by every worker process.

Per-user limits: ``limits`` (the limit kinds, one class each, and ``StartRateGate``), ``leases`` (the
``LeaseStore`` protocol, ``RedisLeaseStore``, ``MemoryLeaseStore``: slots and parked lines keyed by job id),
``keys`` (``job_key``, the default key function: whose limit a message counts against), ``user_admission``
(``UserAdmission``, the one object the middleware and the API share), ``throttle`` (``UserThrottle``, the
Dramatiq middleware: hooks only) and ``sending`` (``ParkAtSend``, a broker mixin parking at send for every
sender). Provider lanes: ``lanes`` (configuration, identity, token estimates), ``lane_store`` (the atomic
Redis scripts) and ``lane_gate`` (the middleware that parks what its lane cannot take, plus the runner's hooks).
"""

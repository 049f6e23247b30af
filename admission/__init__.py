"""Admission: what decides whether a job may call its provider now, shared by every worker process.

``lanes`` (configuration, identity, token estimates), ``lane_store`` (the atomic Redis scripts) and
``lane_gate`` (the Dramatiq middleware that parks what its lane cannot take, plus the runner's hooks).
The per-user throttle still lives in ``middleware/throttle.py``; issue 10 moves it here.
"""

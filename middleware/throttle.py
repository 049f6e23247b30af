"""The per-user throttle's Dramatiq middleware: only hooks, each delegating to the shared ``UserAdmission``.

Place it right after ``AttemptTokens`` (each delivery's fresh token holds its slot) and before anything
that may skip a message, so that a skipped message still finds its slot released.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from admission.user_admission import USER_LIMIT_OPTION, UserAdmission


class UserThrottle(dramatiq.Middleware):
    """Admission's hooks in the worker: take a slot or park before a job runs, give it back after."""

    def __init__(self, admission: UserAdmission) -> None:
        self.admission = admission

    @property
    def actor_options(self) -> set[str]:
        """The per-actor option admission reads (``user_limit``)."""
        return {USER_LIMIT_OPTION}

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start admission's maintenance thread (lease renewals, sweeps)."""
        self.admission.start(broker)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Stop the maintenance thread."""
        self.admission.stop()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Take a slot for the message's user, or park or delay it (``SkipMessage``); fails closed."""
        self.admission.admit(broker, message)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Give the slot back, handing it to the user's oldest parked message."""
        self.admission.release(broker, message)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message skipped after it took a slot (by a later middleware) gives the slot back too."""
        self.admission.release(broker, message)

"""What a message is limited by: the one place that reads a job's ``user_id`` and ``job_id`` from a message.

The composition root passes ``job_key`` to ``UserAdmission`` (its ``key_of``); nothing else reads payload
positions. The API's ``enqueue_*`` and ``actor.send(...)`` both send keyword arguments; the positional
form ``(job_id, user_id, ...)`` is still accepted for messages sent that way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class JobKey:
    """Whose limit a message counts against (``user_id``), and which job it carries (``job_id``, if any).

    A parked message waits in line under its ``job_id`` (its message id when it has none): a cancel takes
    the job out by id, and a second message of a job already in line is not parked twice.
    """

    user_id: str
    job_id: str | None = None


#: The key function ``UserAdmission`` takes: a message's ``JobKey``, or None for a message no limit applies to.
KeyOf = Callable[[Any], JobKey | None]


def _argument(message: Any, name: str, position: int) -> str | None:
    value = message.kwargs.get(name)
    if value is None and len(message.args) > position:
        value = message.args[position]
    return value if isinstance(value, str) and value else None


def job_key(message: Any) -> JobKey | None:
    """``user_id`` and ``job_id`` from the message's keywords (else its 2nd and 1st positional arguments)."""
    user_id = _argument(message, "user_id", 1)
    if user_id is None:
        return None
    return JobKey(user_id=user_id, job_id=_argument(message, "job_id", 0))

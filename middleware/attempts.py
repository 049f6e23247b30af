"""A fresh attempt token for every delivery: what fences a job row and holds a throttle slot.

The broker's message id cannot fence: a message redelivered while its first copy still runs (a
worker frozen past the broker's heartbeat timeout) has the same id, so both copies would own the
job and its throttle slot at once. The token is new for each delivery, even of the same message.
"""

from __future__ import annotations

import uuid
from typing import Any

import dramatiq

#: The message option that carries the token of the delivery being processed.
TOKEN_OPTION = "attempt_token"  # noqa: S105  # an option name, not a secret


def attempt_token_of(message: Any) -> str | None:
    """The attempt token ``AttemptTokens`` gave the delivery of ``message``, if any."""
    token = message.options.get(TOKEN_OPTION)
    return token if isinstance(token, str) and token else None


class AttemptTokens(dramatiq.Middleware):
    """Give each delivery a fresh attempt token before any other middleware sees it (keep it first)."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Replace whatever token a copy of this message carried with a new one."""
        message.options[TOKEN_OPTION] = uuid.uuid4().hex

"""Keep prompts out of Dramatiq's own log lines.

Dramatiq logs a message as ``actor(args..., kwargs...)`` when it is skipped or fails, which would
write the user's prompt at WARNING and ERROR. This filter renders such arguments as
``actor_name[message_id]`` instead, and reports a throttled (skipped) message at INFO: parking a job
is normal operation, not a warning.
"""

from __future__ import annotations

import logging

from dramatiq import Message
from dramatiq.broker import MessageProxy

#: The loggers of Dramatiq's worker threads, which log whole messages.
DRAMATIQ_MESSAGE_LOGGERS = ("dramatiq.worker.WorkerThread",)


class RedactMessages(logging.Filter):
    """Replace Dramatiq messages among a record's arguments with their actor name and id."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        if isinstance(record.args, tuple) and any(isinstance(a, Message | MessageProxy) for a in record.args):
            record.args = tuple(
                f"{arg.actor_name}[{arg.message_id}]" if isinstance(arg, Message | MessageProxy) else arg
                for arg in record.args
            )
            if record.levelno == logging.WARNING and record.msg == "Message %s was skipped.":
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install() -> None:
    """Attach the filter to Dramatiq's message-logging loggers (idempotent)."""
    for name in DRAMATIQ_MESSAGE_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(existing, RedactMessages) for existing in target.filters):
            target.addFilter(RedactMessages())

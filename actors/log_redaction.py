"""Keep prompts and secrets out of every log line of the process, whichever logger or handler writes it.

Installed as the log record factory, so it sees each record once, when it is made, before any filter,
handler or formatter (ours, Dramatiq's, SQLAlchemy's or the host web app's):

- Dramatiq logs a message as ``actor(args..., kwargs...)`` when it is skipped or fails, which would
  write the user's prompt at WARNING and ERROR: such arguments are rendered as ``actor_name[message_id]``,
  and a throttled (skipped) message is reported at INFO, since parking a job is normal operation.
- Every configured secret and anything shaped like an API key or bearer token is masked in the message
  and in the exception text (``repositories.redaction``, the one place that decides what a secret is).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from dramatiq import Message
from dramatiq.broker import MessageProxy

from repositories.redaction import redact

_SKIPPED = "Message %s was skipped."


def scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Rewrite ``record`` in place (see the module docstring) and return it."""
    if isinstance(record.args, tuple) and any(isinstance(arg, Message | MessageProxy) for arg in record.args):
        record.args = tuple(
            f"{arg.actor_name}[{arg.message_id}]" if isinstance(arg, Message | MessageProxy) else arg
            for arg in record.args
        )
        if record.levelno == logging.WARNING and record.msg == _SKIPPED:
            record.levelno, record.levelname = logging.INFO, "INFO"
    try:
        message = record.getMessage()
    except Exception:  # a malformed call: leave it to logging's own error report
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = redact(text)
        if clean != text:
            # Formatters use exc_text when it is set instead of formatting the exception again.
            record.exc_text = clean
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class _ScrubbingFactory:
    """Wraps the previous record factory; recognisable, so installing twice does not wrap twice."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return scrub(self.previous(*args, **kwargs))


def install() -> None:
    """Make every log record of this process pass through ``scrub`` (idempotent)."""
    current = logging.getLogRecordFactory()
    if not isinstance(current, _ScrubbingFactory):
        logging.setLogRecordFactory(_ScrubbingFactory(current))

"""Worker log format: the ids carried in ``extra`` shown on every line, as text or as JSON lines."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import dramatiq

#: ``extra`` fields the service puts on its records, in the order they are shown.
CONTEXT_FIELDS = ("job_id", "user_id", "kind", "provider", "attempt", "status", "message_id")

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"

#: The loggers of this service's own packages, which ``LOG_LEVEL`` sets in a worker.
SERVICE_LOGGERS = ("actors", "admission", "brokers", "middleware", "repositories")
#: Libraries whose per-request INFO lines repeat what the service's own lines say: kept to warnings.
QUIET_LOGGERS = ("httpx", "httpcore")


class ContextFormatter(logging.Formatter):
    """Text lines with ``key=value`` for the context fields a record carries."""

    def format(self, record: logging.LogRecord) -> str:
        """Dramatiq's usual line, then the record's ids."""
        line = super().format(record)
        context = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        return f"{line} [{context}]" if context else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, thread and the context fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialise the record; an exception goes in ``exc_info`` as text."""
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                payload[name] = getattr(record, name)
        if record.exc_info:
            # exc_text, when set, is the masked text (actors.log_redaction): never format the exception again.
            payload["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def formatter_for(log_format: str) -> logging.Formatter:
    """``json`` or ``text``."""
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
        return formatter
    return ContextFormatter(TEXT_FORMAT)


class LogFormat(dramatiq.Middleware):
    """Put ``formatter_for(log_format)`` on the root handlers of every worker process when it boots, and set the
    level of the service's own loggers to ``log_level`` when one is given.

    Dramatiq configures logging in its CLI before it imports the actors, so the format is applied at
    ``after_process_boot`` rather than at import time (web code importing ``actors`` keeps its own).
    Dramatiq's own lines (boot, ready, shutdown) keep the CLI's level (INFO, or DEBUG with ``-v``), so that
    a supervisor still sees the worker become ready; httpx's line per provider request is left out.

    Parameters:
      log_format: ``text`` (Dramatiq's line plus the ids) or ``json`` (one object per line).
      log_level: a level name (``WARNING``...) for the service's loggers; None leaves them at the CLI's level.
    """

    def __init__(self, *, log_format: str = "text", log_level: str | None = None) -> None:
        if log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if log_level is not None and not isinstance(logging.getLevelName(log_level.upper()), int):
            raise ValueError(f"log_level must be a level name such as INFO or WARNING, not {log_level!r}")
        self.log_format = log_format
        self.log_level = log_level.upper() if log_level is not None else None

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Swap the formatters of the root logger's handlers, and set its level."""
        if self.log_level is not None:
            # On the loggers, not their handlers: a record below the level is then never even built.
            for name in SERVICE_LOGGERS:
                logging.getLogger(name).setLevel(self.log_level)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        formatter = formatter_for(self.log_format)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)

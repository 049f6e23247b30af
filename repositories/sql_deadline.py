"""Client-side deadlines for SQL calls: no statement, commit or ping waits on PostgreSQL longer than a bound.

PostgreSQL's own ``statement_timeout`` is set as well and cancels a slow statement cleanly, but it cannot
help when the server or the network stops answering: the driver waits on its socket forever (85 s and
more were seen behind a silent proxy). ``StatementDeadline`` wraps the dialect's execute, commit,
rollback and ping calls; one watchdog thread per engine shuts down the socket of a call that runs past
its deadline, so the blocked driver call fails at once with a disconnect error, SQLAlchemy discards the
connection, and the caller can report ``StoreUnavailable``. Connecting is bounded by libpq's
``connect_timeout`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from repositories.redaction import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

_unbounded = threading.local()


class StoreUnavailable(ConnectionError):
    """The job store refused the connection, failed it, or did not answer within its timeout.

    The message says which, without SQL or parameters. A write that was in flight may or may not have
    been applied; every write of the store is a compare-and-set, so trying again is safe.
    """


@dataclass(eq=False, slots=True)
class _Armed:
    key: int
    deadline: float
    connection: Any
    expired: bool = False


class StatementDeadline:
    """Interrupts any guarded database call that runs longer than ``timeout_s`` seconds (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._armed: dict[int, _Armed] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._watcher_asleep = False
        """The watchdog waits with no deadline (nothing was armed for a while): an arming must wake it."""
        self._armings = 0
        """Calls guarded so far: the watchdog sleeps for good only after a check saw none armed since the last."""

    def install(self, engine: Engine) -> None:
        """Guard the engine's dialect calls that wait on the server (this engine's dialect instance only)."""
        dialect = engine.dialect
        for name, connection_of in (
            ("do_execute", _cursor_connection),
            ("do_executemany", _cursor_connection),
            ("do_execute_no_params", _cursor_connection),
            ("do_commit", _first_argument),
            ("do_rollback", _first_argument),
            ("do_ping", _first_argument),
        ):
            original = getattr(dialect, name)
            if name == "do_ping":
                original = _closing_on_failure(original)
            setattr(dialect, name, self._guarded(original, connection_of))

    def _guarded(self, call: Callable[..., T], connection_of: Callable[[tuple[Any, ...]], Any]) -> Callable[..., T]:
        @functools.wraps(call)
        def guarded(*args: Any, **kwargs: Any) -> T:
            if getattr(_unbounded, "depth", 0):
                return call(*args, **kwargs)
            with self.guard(connection_of(args)):
                return call(*args, **kwargs)

        return guarded

    @contextlib.contextmanager
    def guard(self, connection: Any) -> Iterator[None]:
        """Run the block with ``connection``'s socket shut down if it takes longer than ``timeout_s``."""
        armed = _Armed(next(self._keys), time.monotonic() + self.timeout_s, connection)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="sql-deadline", daemon=True)
                self._thread.start()
            self._armed[armed.key] = armed
            self._armings += 1
            if self._watcher_asleep:
                # Otherwise the watchdog wakes within ``timeout_s`` anyway, before this call's deadline.
                self._watcher_asleep = False
                self._cond.notify()
        try:
            yield
        except Exception as exc:
            if armed.expired:
                # Same DB-API class (SQLAlchemy still sees a disconnect and discards the connection), clear text.
                raise _reraised(exc, f"no answer from the database within {self.timeout_s:g}s") from exc
            raise
        finally:
            with self._cond:
                self._armed.pop(armed.key, None)

    def _watch(self) -> None:
        """Shut down the connections of expired calls.

        Calls come and go thousands of times a second on a busy worker; waking this thread for each would
        cost more than the calls. It wakes at the earliest deadline, or ``timeout_s`` after the last check
        when nothing is armed (a call armed meanwhile expires no earlier), and only after such a check
        found nothing armed since the one before does it sleep until ``guard`` wakes it.
        """
        checked = -1
        with self._cond:
            while True:
                if not self._armed:
                    if self._armings == checked:
                        self._watcher_asleep = True
                        while self._watcher_asleep:
                            self._cond.wait()
                    checked = self._armings
                    self._cond.wait(self.timeout_s)
                    continue
                checked = self._armings
                now = time.monotonic()
                for armed in [a for a in self._armed.values() if a.deadline <= now]:
                    del self._armed[armed.key]
                    armed.expired = True
                    # Under the lock: the call cannot finish and hand its connection to someone else meanwhile.
                    _shut_down(armed.connection)
                if self._armed:
                    self._cond.wait(max(0.01, min(a.deadline for a in self._armed.values()) - now))


@contextlib.contextmanager
def unbounded() -> Iterator[None]:
    """Run database calls of this thread without the client-side deadline (migrations, advisory-lock waits)."""
    _unbounded.depth = getattr(_unbounded, "depth", 0) + 1
    try:
        yield
    finally:
        _unbounded.depth -= 1


def store_unavailable(exc: Exception) -> StoreUnavailable | None:
    """The ``StoreUnavailable`` an exception of a store call stands for, or None when it is not an outage.

    Connection failures, disconnects, timeouts (ours, the server's ``statement_timeout``, the pool's
    checkout timeout) and SQLite's "database is locked" count; constraint violations and the like do not.
    """
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, PoolTimeoutError):
        return StoreUnavailable("job store unavailable: no free database connection in time")
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    names = {cls.__name__ for cls in type(orig).__mro__}
    text = str(orig) if orig is not None else ""
    outage = (
        exc.connection_invalidated
        or "OperationalError" in names
        or "InterfaceError" in names
        or "QueryCanceled" in names
        or "database is locked" in text
    )
    if not outage:
        return None
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), type(orig).__name__)
    return StoreUnavailable(f"job store unavailable: {redact(first_line)[:300]}")


def _closing_on_failure(ping: Callable[[Any], T]) -> Callable[[Any], T]:
    """``ping`` that closes its connection when it fails, so the pool's pre-ping sees a disconnect.

    A socket closed under a ping can leave psycopg mid-statement: restoring autocommit then raises a
    ``ProgrammingError`` on a connection not yet marked broken, which SQLAlchemy would not count as a
    disconnect and would raise instead of reconnecting. A closed connection always counts.
    """

    @functools.wraps(ping)
    def closing(dbapi_connection: Any) -> T:
        try:
            return ping(dbapi_connection)
        except Exception:
            with contextlib.suppress(Exception):
                dbapi_connection.close()
            raise

    return closing


def _cursor_connection(args: tuple[Any, ...]) -> Any:
    return args[0].connection


def _first_argument(args: tuple[Any, ...]) -> Any:
    return args[0]


def _shut_down(connection: Any) -> None:
    try:
        fd = connection.fileno()
        duplicate = socket.socket(fileno=os.dup(fd))
    except Exception:  # already closed, or not a socket-backed connection
        return
    with contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)
    duplicate.close()
    logger.warning("database call ran past its deadline: connection interrupted")


def _reraised(exc: Exception, message: str) -> Exception:
    try:
        return type(exc)(message)
    except Exception:
        return exc

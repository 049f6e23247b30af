"""The process-wide objects the actors and the web API use, built once on first use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import dramatiq

from actors.cancellation import CancelSignals, cancel
from actors.jobs import JobRunner
from actors.payloads import DEFAULT_MAX_REQUEST_BYTES
from middleware.limiters import ConcurrencyLimit, UserLimit
from middleware.throttle import throttle_of
from repositories.store import JobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The job store, the job runner and the cancel signals of this process."""

    store: JobStore
    runner: JobRunner
    cancel_signals: CancelSignals | None

    def cancel(self, job_id: str, user_id: str) -> bool:
        """Cancel the user's pending or processing job, signal the worker running it, and take the job out
        of the throttle's line if it waits there."""
        publish = self.cancel_signals.publish if self.cancel_signals is not None else None
        if not cancel(self.store, job_id, user_id, publish=publish):
            return False
        broker = dramatiq.get_broker()
        throttle = throttle_of(broker)
        if throttle is not None:
            try:
                throttle.drop_parked(broker, job_id, user_id)
            except Exception:
                # The cancel is committed: a parked message left behind is dropped when its slot comes.
                logger.warning("could not take a cancelled job out of the throttle's line", exc_info=True)
        return True


@dataclass(frozen=True, slots=True)
class ActorOptions:
    """Per-actor options fixed when the actors are declared."""

    generate_time_limit_ms: int = 960_000
    preview_time_limit_ms: int = 120_000
    retention_days: int = 7
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    generate_user_limit: UserLimit = field(default_factory=lambda: ConcurrencyLimit(5))
    preview_user_limit: UserLimit = field(default_factory=lambda: ConcurrencyLimit(10))


_lock = threading.Lock()
_factory: Callable[[], Runtime] | None = None
_runtime: Runtime | None = None
_options = ActorOptions()


def configure(factory: Callable[[], Runtime], options: ActorOptions) -> None:
    """Set how the runtime is built; it is built lazily, so importing ``actors`` opens no connection."""
    global _factory, _runtime, _options
    with _lock:
        replaced = _runtime
        _factory = factory
        _runtime = None
        _options = options
    if replaced is not None:
        # Its pooled connections would otherwise stay open until the garbage collector finds the engine.
        replaced.store.engine.dispose()


def options() -> ActorOptions:
    """The actor options set by ``configure``."""
    return _options


def current() -> Runtime:
    """The runtime of this process, built on first call."""
    global _runtime
    if _runtime is not None:
        return _runtime
    with _lock:
        if _runtime is None:
            if _factory is None:
                raise RuntimeError("actors runtime is not configured: import actors first")
            _runtime = _factory()
        return _runtime

"""Point the test process's ``actors`` runtime at other settings for one test, then put the old one back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from actors import runtime
from actors.runtime import Runtime
from actors.wiring import actor_options, build_runtime
from settings import Settings


@contextlib.contextmanager
def runtime_on(settings: Settings) -> Iterator[Runtime]:
    """``enqueue_*``, ``get_job`` and ``cancel_job`` use a runtime built from ``settings`` inside the block."""
    saved = (runtime._factory, runtime._runtime, runtime._options)
    runtime.configure(lambda: build_runtime(settings), actor_options(settings))
    current = runtime.current()
    try:
        yield current
    finally:
        current.store.engine.dispose()
        if current.cancel_signals is not None:
            current.cancel_signals.close()
        with runtime._lock:
            runtime._factory, runtime._runtime, runtime._options = saved

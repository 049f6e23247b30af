"""What the scale benchmarks share: CPU and RSS of a worker's process tree, a fresh PostgreSQL database,
the worker environments of this project and of the bare-Dramatiq baseline."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.providers import tree_usage

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(session_id: int) -> float:
    """User plus system CPU seconds spent so far by the live processes of the session a worker leads."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, session, ..., utime (12th), stime (13th).
        if len(fields) > 12 and int(fields[3]) == session_id:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS_PER_S


@dataclass
class TreeMeter:
    """CPU seconds and peak RSS of a worker's process tree between ``start`` and ``stop``."""

    session_id: int
    interval_s: float = 0.25
    peak_rss: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0 = 0.0
        self._wall0 = 0.0

    def start(self) -> TreeMeter:
        """Take the starting CPU reading and sample RSS in a thread."""
        self._cpu0, self._wall0 = tree_cpu_seconds(self.session_id), time.monotonic()
        self.peak_rss = tree_usage(self.session_id)[0]
        self._thread = threading.Thread(target=self._sample, name="tree-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TreeMeter:
        """Take the closing CPU reading."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.cpu_s = tree_cpu_seconds(self.session_id) - self._cpu0
        self.wall_s = time.monotonic() - self._wall0
        return self

    @property
    def cores(self) -> float:
        """Average cores busy over the measured span."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, tree_usage(self.session_id)[0])


@contextlib.contextmanager
def fresh_postgres(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A new PostgreSQL database for this run (its URL), dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"bench_scale_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def project_env(redis_url: str, database_url: str, base_url: str, **extra: str) -> dict[str, str]:
    """The environment of this project's worker against the bench SSE server (no provider key inherited)."""
    from tests.harness import PROJECT_ROOT

    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OPENROUTER_", "ANTHROPIC_", "CLAUDE_"))}
    return {
        **inherited,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "LLM_PROVIDER": "openrouter",
        "OPENROUTER_BASE_URL": base_url,
        "OPENROUTER_API_KEY": "bench",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
        **extra,
    }


def bare_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of the bare-Dramatiq baseline worker (``bench.bare_actors``)."""
    return project_env(redis_url, "sqlite:///unused.db", "http://127.0.0.1:9/unused", **extra)


def cpu_ms_per(meter: TreeMeter, count: int) -> float:
    """CPU milliseconds per item over the meter's span."""
    return meter.cpu_s * 1000 / count if count else float("nan")


BROKERS = ("redis", "rabbitmq")


@contextlib.contextmanager
def message_broker(kind: str, redis_url: str) -> Iterator[dict[str, str]]:
    """The worker environment for broker ``kind``; with ``rabbitmq`` a virtual host of the run's own
    (``BROKER_URL``), which the bench's own ``JobQueue`` sends to as well (``bench_settings``)."""
    if kind == "redis":
        yield {}
        return
    from tests.integration.rabbitmq import own_vhost

    with own_vhost() as url:
        yield {"BROKER_URL": url}

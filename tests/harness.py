"""Process harness shared by the integration tests and the benchmarks: a real worker process, condition waits.

It has no side effects on import (unlike ``tests/conftest.py``), so ``bench/`` can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "Worker process is ready for action."


def wait_until(condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what or condition}")
        time.sleep(interval)


def wait_for_job_status(store: Any, job_id: str, *statuses: Any, timeout: float = 20.0) -> Any:
    """Wait until the job in ``store`` reaches one of ``statuses`` (any final status when none are given)."""
    from repositories.store import FINAL_STATUSES

    wanted = set(statuses) or set(FINAL_STATUSES)

    def reached() -> Any:
        job = store.get(job_id)
        return job if job is not None and job.status in wanted else None

    return wait_until(reached, timeout=timeout, what=f"job {job_id} to reach {sorted(wanted)}")


def wait_until_no_message_for(client: Any, job_id: str, *, timeout: float = 20.0) -> None:
    """Wait until no message about ``job_id`` is queued, delayed or unacked in Redis (dead letters are done)."""
    needle = job_id.encode()

    def handled() -> bool:
        live = (key for key in client.scan_iter(match="dramatiq:*.msgs") if b".XQ." not in key)
        return not any(needle in body for key in live for body in client.hvals(key))

    wait_until(handled, timeout=timeout, interval=0.05, what=f"the messages of {job_id} to be handled")


class WorkerProcess:
    """One ``dramatiq actors`` command in its own process group, logging to a file."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        threads: int = 8,
        processes: int = 1,
        actors_module: str = "actors",
    ) -> None:
        self.env = dict(env)
        self.actors_module = actors_module
        self.log_path = log_path
        self.threads = threads
        self.processes = processes
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until every worker process reports ready."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                self.actors_module,
                "--processes",
                str(self.processes),
                "--threads",
                str(self.threads),
                "--worker-shutdown-timeout",
                "10000",
            ],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_until(self._ready_or_exited, timeout=timeout, interval=0.1, what="the worker to be ready")
        except AssertionError:
            # Never leave a worker that did not become ready running: it would consume later tests' messages.
            self.kill()
            raise
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return self

    def _ready_or_exited(self) -> bool:
        return self._ready_count() >= self.processes or self.process is None or self.process.poll() is not None

    def _ready_count(self) -> int:
        return self.log_path.read_bytes()[self._log_offset :].count(READY_LINE.encode())

    def log(self) -> str:
        """Everything the worker has printed so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace") if self.log_path.exists() else ""

    def stop(self, *, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group and wait; SIGKILL whatever is left after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL every process of the worker at once, as a crashed machine would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

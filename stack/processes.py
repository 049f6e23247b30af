"""Child processes of ``make run``: each in its own process group, its output prefixed and forwarded to the console."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)


class Console:
    """Writes whole lines to one stream from many threads, so the output of different processes never interleaves."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def line(self, source: str, text: str) -> None:
        """Write ``text`` as one line prefixed with ``[source]``."""
        self.block(f"[{source}] {text}")

    def block(self, text: str) -> None:
        """Write ``text`` (one or more lines) as it is, and flush."""
        # A closed console (``make run | head``) drops the text: the readers must keep draining the
        # children's pipes, or a child blocks on its next write.
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.write(text if text.endswith("\n") else text + "\n")
            self._stream.flush()


def describe_exit(returncode: int) -> str:
    """``exit code 1`` or, for a process ended by a signal, ``signal 11, SIGSEGV``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {-returncode}, {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"exit code {returncode}"


class ChildProcess:
    """One command run in its own process group (so a terminal's Ctrl+C reaches only ``make run`` itself).

    Its stdout and stderr are forwarded line by line to the console; ``ready`` is set when a line
    contains ``ready_marker``.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        console: Console,
        ready_marker: str,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env)
        self.ready_marker = ready_marker
        self.ready = threading.Event()
        self._console = console
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the command and the thread that forwards its output."""
        self._process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        output = self._process.stdout
        if output is None:
            raise RuntimeError(f"{self.name} has no output pipe")
        self._reader = threading.Thread(
            target=self._forward_output, args=(output,), name=f"{self.name}-output", daemon=True
        )
        self._reader.start()
        logger.info("%s started (pid %d): %s", self.name, self._process.pid, " ".join(self.argv))

    def _forward_output(self, output: IO[bytes]) -> None:
        marker = self.ready_marker.encode()
        with output:
            for raw in iter(output.readline, b""):
                if marker in raw:
                    self.ready.set()
                self._console.line(self.name, raw.decode("utf-8", "replace").rstrip("\r\n"))

    def poll(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal), else None."""
        return None if self._process is None else self._process.poll()

    def signal_group(self, signum: signal.Signals) -> None:
        """Send ``signum`` to every process of the group; nothing happens when the group is gone."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    def terminate(self) -> None:
        """Ask the process (not the rest of its group) to stop with SIGTERM."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def reap(self, *, timeout_s: float = 5.0) -> None:
        """Wait for the process to be gone and for its last output to be forwarded."""
        if self._process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)


def stop_children(children: Sequence[ChildProcess], *, grace_s: float, hurry: Callable[[], bool]) -> None:
    """SIGTERM every child, wait up to ``grace_s`` seconds, then SIGKILL whatever is left of the groups.

    The wait is cut short when ``hurry()`` turns true (a second Ctrl+C).
    """
    running = [child for child in children if child.poll() is None]
    for child in running:
        logger.info("stopping %s", child.name)
        # Only the leader: Dramatiq's main process forwards SIGTERM to its worker processes, and a
        # worker process that gets a second SIGTERM stops at once instead of finishing its messages.
        child.terminate()
    deadline = time.monotonic() + grace_s
    while any(child.poll() is None for child in running) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    hurried = hurry()
    for child in children:
        if child.poll() is None:
            reason = "stop cut short" if hurried else f"not stopped after {grace_s:.0f} s"
            logger.warning("%s %s: killing it", child.name, reason)
        # Also for a child that ended by itself: what it forked may still be alive in its group.
        child.signal_group(signal.SIGKILL)
        child.reap()
        returncode = child.poll()
        if child in running and returncode is not None:
            logger.info("%s stopped (%s)", child.name, describe_exit(returncode))

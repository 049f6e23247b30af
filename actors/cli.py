"""The operator CLI ``llm-jobs``: submit, inspect, follow, cancel, list and clean up jobs from a terminal.

An entry point: importing ``actors`` reads the settings and configures the broker, and nothing connects
until a subcommand needs the job store or Redis. Errors are one line on stderr: exit 2 for bad
arguments or invalid input, 1 for a job that did not complete or a service that cannot be reached,
130 after Ctrl+C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import dramatiq.errors
import redis
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

import actors
from actors import api as actors_api
from actors.payloads import describe_validation_error
from actors.queue import current
from actors.reconciler import Reconciler
from actors.wiring import lane_book
from admission.lane_store import RedisLaneStore
from repositories.redaction import redact
from repositories.sql_deadline import StoreUnavailable
from repositories.store import Job, JobStatus, JobStore, utcnow

PROG = "llm-jobs"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The ``submit`` option behind each field of a validation error, so the error names what to fix.
SUBMIT_OPTIONS = {
    "user_id": "--user",
    "job_id": "--job-id",
    "params.model": "--model",
    "params.messages": "--prompt/--messages-json/--system",
    "params.temperature": "--temperature",
    "params.max_tokens": "--max-tokens",
}

#: Longest stretch of text shown by ``status`` in plain output, in characters.
CONTENT_PREVIEW_CHARS = 120

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A subcommand cannot do what was asked: ``message`` is printed as one line, ``exit_code`` returned."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class _ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line and an exit code, not a usage dump and ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{self.prog}: {message} (see --help)", EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand of ``llm-jobs`` with ``argv`` (``sys.argv[1:]`` when None) and return its exit status."""
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except SystemExit as exc:  # --help and --version end the parse with SystemExit(0)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except CommandError as exc:
        _fail(exc.message)
        return exc.exit_code
    except ValidationError as exc:
        _fail("error: " + describe_validation_error(exc, what="input"))
        return EXIT_USAGE
    except ValueError as exc:
        _fail(f"error: {_one_line(str(exc))}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except (redis.RedisError, dramatiq.errors.BrokerConnectionError) as exc:
        _fail(f"error: cannot reach Redis (REDIS_URL): {_one_line(str(exc)) or type(exc).__name__}")
        return EXIT_FAILED
    except SQLAlchemyError as exc:
        _fail(f"error: cannot use the job store (DATABASE_URL): {_database_error(exc)}")
        return EXIT_FAILED
    except StoreUnavailable as exc:
        _fail(f"error: cannot use the job store (DATABASE_URL): {exc}")
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-jobs`` argument parser with one subparser per subcommand."""
    parser = _ArgumentParser(
        prog=PROG,
        description="Operate the LLM job queue: submit, inspect, follow, cancel, list and clean up jobs.",
        epilog="Settings come from the environment and .env (REDIS_URL, DATABASE_URL, ...), as for the worker. "
        "Exit status: 0 success, 1 job not completed or service unreachable, 2 invalid input, 130 Ctrl+C.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    submit = commands.add_parser(
        "submit",
        help="queue a generation and print its job id",
        description="Queue a generation and print its job id. With --wait, follow it instead: the text goes to "
        "stdout as it arrives, the job id and the final status line to stderr; exit 0 when it completed, else 1.",
    )
    submit.add_argument("--user", required=True, help="the user the job belongs to")
    submit.add_argument("--model", required=True, help="the provider's model name")
    prompt = submit.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the user message")
    prompt.add_argument(
        "--messages-json", metavar="JSON", help='the whole conversation: [{"role": "user", "content": "..."}, ...]'
    )
    submit.add_argument("--system", help="a system message put before the conversation")
    submit.add_argument("--temperature", type=float, help="sampling temperature, 0..2")
    submit.add_argument("--max-tokens", type=int, help="most tokens to generate")
    submit.add_argument("--job-id", help="your own job id: submitting the same id twice is one job")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends and print its text")
    submit.add_argument(
        "--interval", type=_positive_float, default=0.25, metavar="S", help="poll interval of --wait (default 0.25)"
    )
    submit.set_defaults(handler=_submit)

    status = commands.add_parser(
        "status", help="show one job", description="Show a job's status, attempts, error, text and usage."
    )
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--user", help="only a job of this user")
    status.add_argument("--json", action="store_true", help="print the whole job as JSON, text included")
    status.set_defaults(handler=_status)

    watch = commands.add_parser(
        "watch",
        help="follow a job's text live",
        description="Print a job's text as it grows (only the new part each time) on stdout, then its final "
        "status line on stderr; exit 0 when it completed, 1 when it failed or was cancelled.",
    )
    watch.add_argument("job_id", metavar="JOB_ID")
    watch.add_argument("--user", help="only a job of this user")
    watch.add_argument(
        "--interval", type=_positive_float, default=0.25, metavar="S", help="seconds between polls (default 0.25)"
    )
    watch.set_defaults(handler=_watch)

    cancel = commands.add_parser(
        "cancel",
        help="cancel a pending or processing job",
        description="Cancel a user's pending or processing job; exit 1 with the reason when it was not cancelled.",
    )
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--user", required=True, help="the user the job belongs to")
    cancel.set_defaults(handler=_cancel)

    listing = commands.add_parser("list", help="list the newest jobs", description="List the newest jobs first.")
    listing.add_argument("--user", help="only this user's jobs")
    listing.add_argument(
        "--status",
        dest="statuses",
        action="extend",
        nargs="+",
        default=[],
        choices=[str(s) for s in JobStatus],
        metavar="S",
        help="only jobs in these statuses: " + ", ".join(JobStatus),
    )
    listing.add_argument("--limit", type=_positive_int, default=50, help="most jobs shown (default 50)")
    listing.set_defaults(handler=_list)

    stats = commands.add_parser(
        "stats",
        help="jobs by status, load per user, oldest pending job",
        description="Count jobs by status, show each user's running and waiting (throttled) jobs per actor, and "
        "the age of the oldest pending job.",
    )
    stats.set_defaults(handler=_stats)

    requeue = commands.add_parser(
        "requeue",
        help="send stuck jobs back to work",
        description="Send a pending job, or a processing job whose heartbeat is older than JOB_LEASE_S, back to "
        "work with a new message, without using a retry; with --stuck, every job the reconciler finds with no "
        "message in the broker. A duplicate message is harmless: only one delivery can run a job.",
    )
    target = requeue.add_mutually_exclusive_group(required=True)
    target.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the job to send back to work")
    target.add_argument("--stuck", action="store_true", help="every stuck job (what the scheduler's sweep does)")
    requeue.set_defaults(handler=_requeue)

    cleanup = commands.add_parser(
        "cleanup",
        help="delete old finished jobs",
        description="Delete completed, failed and cancelled jobs last updated more than --days ago, as the "
        "nightly cleanup does; pending and processing jobs are never deleted.",
    )
    cleanup.add_argument(
        "--days", type=_positive_int, help="age in days of the jobs to delete (default JOB_RETENTION_DAYS)"
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only count and list what would be deleted")
    cleanup.add_argument("--limit", type=_positive_int, default=20, help="most job ids listed by --dry-run")
    cleanup.set_defaults(handler=_cleanup)
    return parser


# -- subcommands ----------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    messages: list[Any] = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
    else:
        messages.extend(_parse_messages(args.messages_json))
    params: dict[str, Any] = {"model": args.model, "messages": messages}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    try:
        job_id = actors.enqueue_generation(user_id=args.user, params=params, job_id=args.job_id)
    except ValidationError as exc:
        reason = describe_validation_error(exc, what="input", options=SUBMIT_OPTIONS)
        raise CommandError(f"{PROG} submit: {reason}", EXIT_USAGE) from None
    if not args.wait:
        print(job_id)
        return EXIT_OK
    print(f"job {job_id}", file=sys.stderr)
    return _exit_status(follow(job_id, user_id=args.user, interval_s=args.interval))


def _status(args: argparse.Namespace) -> int:
    job = _require_job(args.job_id, args.user)
    if args.json:
        print(json.dumps(dataclasses.asdict(job), default=_json_value, indent=2, ensure_ascii=False))
        return EXIT_OK
    usage = job.usage or (job.response or {}).get("usage")
    fields: list[tuple[str, str]] = [
        ("job_id", job.job_id),
        ("user", job.user_id),
        ("kind", str(job.kind)),
        ("status", str(job.status)),
        ("attempts", str(job.attempts)),
        ("provider", job.provider or "-"),
        ("model", job.model or "-"),
        ("error", _one_line(job.error) if job.error else "-"),
        ("content", _describe_content(job.content)),
        ("usage", _describe_usage(usage)),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("updated", _when(job.updated_at)),
        ("finished", _when(job.finished_at)),
    ]
    if job.response is not None and "used_ai" in job.response:
        fields.insert(9, ("used ai", "yes" if job.response["used_ai"] else "no"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")
    return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    _require_job(args.job_id, args.user)
    return _exit_status(follow(args.job_id, user_id=args.user, interval_s=args.interval))


def _cancel(args: argparse.Namespace) -> int:
    if actors.cancel_job(args.job_id, user_id=args.user):
        print("cancelled")
        return EXIT_OK
    # Another user's job gets the same answer as an unknown id: nothing tells that it exists.
    job = actors.get_job(args.job_id, user_id=args.user)
    if job is None:
        reason = f"no job {args.job_id!r} of user {args.user!r}"
    elif job.status.is_final:
        reason = f"job {args.job_id} is already {job.status}"
    else:
        reason = f"job {args.job_id} is {job.status}; try again"
    raise CommandError(f"{PROG} cancel: not cancelled: {reason}")


def _list(args: argparse.Namespace) -> int:
    statuses = [JobStatus(s) for s in args.statuses]
    jobs = _store().list_jobs(user_id=args.user, statuses=statuses, limit=args.limit)
    if not jobs:
        print("no jobs")
        return EXIT_OK
    rows = [
        [job.job_id, job.user_id, job.kind, job.status, str(job.attempts), _when(job.created_at), str(len(job.content))]
        for job in jobs
    ]
    _print_table(["job_id", "user", "kind", "status", "attempts", "created", "chars"], rows, numeric={4, 6})
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    store = _store()
    counts = store.count_by_status()
    print("jobs by status")
    width = max(len(str(s)) for s in JobStatus)
    for status in JobStatus:
        print(f"  {status:<{width}}  {counts.get(status, 0):>8}")
    print(f"  {'total':<{width}}  {sum(counts.values()):>8}")
    print("running and waiting per user")
    loads = actors.user_loads()
    if loads:
        rows = [[load.actor, load.user_id, str(load.running), str(load.waiting)] for load in loads]
        _print_table(["actor", "user", "running", "waiting"], rows, numeric={2, 3}, indent="  ")
    else:
        print("  none")
    _print_lanes()
    reconciler = _reconciler()
    stuck = reconciler.stuck()
    print(
        f"stuck jobs: {stuck.total} ({len(stuck.processing)} processing with a heartbeat older than "
        f"{reconciler.lease_s:.0f} s, {len(stuck.pending)} pending for over {reconciler.pending_after_s:.0f} s; "
        "none of them has a message in the broker)"
    )
    oldest = store.oldest_pending()
    if oldest is None:
        print("oldest pending job: none")
    else:
        job_id, user_id, created_at = oldest
        age_s = max(0.0, (utcnow() - created_at).total_seconds())
        print(f"oldest pending job: {age_s:.1f} s (job {job_id}, user {user_id})")
    return EXIT_OK


def _print_lanes() -> None:
    """Per provider lane: requests and tokens in its current window, slots in use, pause, jobs waiting."""
    book = lane_book(current().settings)
    if not book:
        return
    print("provider lanes (requests and tokens in the current window)")
    store = RedisLaneStore(actors.broker.client)
    rows = []
    for lane in book.lanes:
        stats = store.stats(lane, lease_ms=current().settings.throttle_lease_s * 1000)
        config = lane.config
        paused = "-"
        if stats.paused_until_ms > time.time() * 1000:
            paused = datetime.fromtimestamp(stats.paused_until_ms / 1000, tz=UTC).strftime("%H:%M:%S")
        elif stats.probing:
            paused = "probing"
        rows.append(
            [
                lane.label(),
                f"{stats.requests}/{config.requests_per_minute or '-'}",
                f"{stats.tokens}/{config.tokens_per_minute or '-'}",
                f"{stats.slots}/{config.concurrent or '-'}",
                paused,
                str(stats.waiting),
                str(stats.rate_limited),
            ]
        )
    _print_table(
        ["lane", "requests", "tokens", "slots", "paused until", "waiting", "429s"],
        rows,
        numeric={5, 6},
        indent="  ",
    )


def _requeue(args: argparse.Namespace) -> int:
    reconciler = _reconciler()
    if args.stuck:
        print(f"requeued {reconciler.sweep()} stuck jobs")
        return EXIT_OK
    job = _require_job(args.job_id, None)
    if job.status.is_final:
        raise CommandError(f"{PROG} requeue: job {job.job_id} is already {job.status}")
    if job.status is JobStatus.PROCESSING and job.heartbeat_at is not None:
        beat_age_s = (utcnow() - job.heartbeat_at).total_seconds()
        if beat_age_s < reconciler.lease_s:
            raise CommandError(
                f"{PROG} requeue: job {job.job_id} is running (heartbeat {beat_age_s:.1f} s ago); it is not stuck"
            )
    if not reconciler.resend(job, reason="requeued by an operator"):
        raise CommandError(f"{PROG} requeue: job {job.job_id} changed meanwhile; try again")
    print(f"requeued {job.job_id}")
    return EXIT_OK


def _reconciler() -> Reconciler:
    return actors_api.reconciler(pending_after_s=current().settings.reconcile_pending_after_s)


def _cleanup(args: argparse.Namespace) -> int:
    days: int = args.days if args.days is not None else current().options.retention_days
    cutoff = utcnow() - timedelta(days=days)
    store = _store()
    scope = f"finished jobs last updated before {_when(cutoff)} (more than {days} days ago)"
    if not args.dry_run:
        print(f"deleted {store.delete_finished_before(cutoff)} {scope}")
        return EXIT_OK
    total = store.count_finished_before(cutoff)
    print(f"dry run: {total} {scope} would be deleted")
    shown = store.finished_before(cutoff, limit=args.limit)
    for job_id in shown:
        print(f"  {job_id}")
    if total > len(shown):
        print(f"  ... and {total - len(shown)} more")
    return EXIT_OK


# -- following a job ------------------------------------------------------------------------------


def follow(job_id: str, *, user_id: str | None, interval_s: float) -> Job:
    """Poll the job every ``interval_s`` seconds, writing only newly added text to stdout, until it is final.

    A retry starts the text over: that is said on stderr and the new attempt's text follows. The final
    status line goes to stderr, so stdout holds only the text.
    """
    shown = ""
    try:
        while True:
            job = actors.get_job(job_id, user_id=user_id)
            if job is None:
                raise CommandError(f"{PROG}: job {job_id} disappeared while it was followed (deleted?)")
            if not job.content.startswith(shown):
                _end_line(shown)
                print(f"-- attempt {job.attempts}: the text starts over ({job.error or 'retried'})", file=sys.stderr)
                shown = ""
            if len(job.content) > len(shown):
                sys.stdout.write(job.content[len(shown) :])
                sys.stdout.flush()
                shown = job.content
            if job.status.is_final:
                _end_line(shown)
                print(_final_line(job), file=sys.stderr)
                return job
            time.sleep(interval_s)
    except KeyboardInterrupt:
        _end_line(shown)
        raise


def _final_line(job: Job) -> str:
    attempts = f"{job.attempts} attempt{'s' if job.attempts != 1 else ''}"
    if job.status is JobStatus.COMPLETED:
        usage = job.usage or (job.response or {}).get("usage")
        return f"-- completed: {len(job.content)} chars, {attempts}, {_describe_usage(usage)}"
    if job.status is JobStatus.CANCELLED:
        return f"-- cancelled: {len(job.content)} chars kept, {attempts}"
    return f"-- {job.status} after {attempts}: {_one_line(job.error or 'no error recorded')}"


def _end_line(shown: str) -> None:
    if shown and not shown.endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()


def _exit_status(job: Job) -> int:
    return EXIT_OK if job.status is JobStatus.COMPLETED else EXIT_FAILED


# -- queries the JobStore does not have yet -------------------------------------------------------


# -- helpers --------------------------------------------------------------------------------------


def _parse_messages(text: str) -> list[Any]:
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(
            f"{PROG} submit: --messages-json is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            EXIT_USAGE,
        ) from None
    if not isinstance(messages, list):
        raise CommandError(
            f'{PROG} submit: --messages-json must be a JSON list like [{{"role": "user", "content": "..."}}]',
            EXIT_USAGE,
        )
    return messages


def _require_job(job_id: str, user_id: str | None) -> Job:
    job = actors.get_job(job_id, user_id=user_id)
    if job is None:
        owner = f" of user {user_id!r}" if user_id is not None else ""
        raise CommandError(f"{PROG}: no job {job_id!r}{owner}")
    return job


def _store() -> JobStore:
    return current().store


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: set[int], indent: str = "") -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        cells = [
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print(indent + "  ".join(cells).rstrip())


def _describe_content(content: str) -> str:
    if not content:
        return "0 chars"
    flat = " ".join(content.split())
    excerpt = flat if len(flat) <= CONTENT_PREVIEW_CHARS else flat[:CONTENT_PREVIEW_CHARS] + "..."
    return f"{len(content)} chars: {excerpt}"


def _describe_usage(usage: Mapping[str, Any] | None) -> str:
    if not usage:
        return "no usage reported"
    return (
        f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion"
        f" = {usage.get('total_tokens', 0)} tokens"
    )


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _database_error(exc: SQLAlchemyError) -> str:
    # A DBAPIError's own text carries the SQL and its parameters (a prompt, say): only the driver's message is shown.
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return _one_line(str(cause)) or type(cause).__name__


def _one_line(text: str) -> str:
    """The first non-empty line of ``text``, with every secret masked (``repositories.redaction``)."""
    return next((redact(part.strip()) for part in text.splitlines() if part.strip()), "")


def _fail(message: str) -> None:
    line = message if message.startswith(PROG) else f"{PROG}: {message}"
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

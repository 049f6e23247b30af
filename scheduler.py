"""The scheduler process (``make scheduler``): enqueues ``cleanup_old_jobs`` on ``CLEANUP_CRON``, and runs
the reconciler every ``RECONCILE_INTERVAL_S``.

The cleanup is only a message; a worker does the deleting. The reconciler re-sends jobs that lost
their message (``actors.reconciler``); it is safe to run in several schedulers at once.
"""

from __future__ import annotations

import logging
import signal
import sys
from datetime import UTC, datetime

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from middleware.log_format import formatter_for
from settings import ConfigurationError, load_settings

logger = logging.getLogger("scheduler")


def send_cleanup() -> None:
    """Enqueue one ``cleanup_old_jobs`` message."""
    from actors import cleanup_old_jobs

    message = cleanup_old_jobs.send()
    logger.info("cleanup_old_jobs enqueued (message %s)", message.message_id)


def resend_unsent(pending_after_s: float = 60.0) -> None:
    """Re-send the jobs with no live message: pending ones untouched for ``pending_after_s``, stale processing ones."""
    from actors.api import resend_unsent as resend

    try:
        resent = resend(older_than_s=pending_after_s)
    except Exception as exc:
        # The store or Redis is down: the next sweep tries again (no traceback: it may carry SQL parameters).
        logger.warning("reconciler sweep failed (%s); next sweep retries", type(exc).__name__)
        return
    if resent:
        logger.warning("re-sent %d jobs whose messages were lost", resent)


def build_scheduler(
    cron: str, *, timezone: str = "UTC", resend_every_s: int = 60, pending_after_s: float = 60.0
) -> BackgroundScheduler:
    """A background scheduler: ``send_cleanup`` on the crontab ``cron``, the reconciler every ``resend_every_s``."""
    scheduler = BackgroundScheduler(timezone=timezone)
    scheduler.add_job(
        resend_unsent,
        "interval",
        seconds=resend_every_s,
        kwargs={"pending_after_s": pending_after_s},
        id="resend_unsent",
        coalesce=True,
        max_instances=1,
    )
    scheduler.add_job(
        send_cleanup,
        CronTrigger.from_crontab(cron, timezone=timezone),
        id="cleanup_old_jobs",
        coalesce=True,
        max_instances=1,
        misfire_grace_time=3600,
    )
    return scheduler


def main() -> int:
    """Run until SIGINT or SIGTERM, logging when the cleanup runs next."""
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"scheduler: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(settings.log_format))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    scheduler = build_scheduler(
        settings.cleanup_cron,
        resend_every_s=settings.reconcile_interval_s,
        pending_after_s=settings.reconcile_pending_after_s,
    )

    # SIGINT and SIGTERM are blocked in every thread (the scheduler's inherit it) and taken by sigwait below:
    # no signal handler runs, because one that stops the scheduler deadlocks when the signal lands while
    # the main thread holds the lock the stop needs (the threading.Event a BlockingScheduler sleeps on).
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    def log_next_run(_event: JobExecutionEvent | None = None) -> None:
        job = scheduler.get_job("cleanup_old_jobs")
        upcoming = job.trigger.get_next_fire_time(None, datetime.now(UTC)) if job is not None else None
        if upcoming is not None:
            logger.info("next cleanup at %s", upcoming.isoformat())

    scheduler.add_listener(log_next_run, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    logger.info(
        "scheduler started: cleanup_old_jobs on %r (UTC), reconciler every %d s",
        settings.cleanup_cron,
        settings.reconcile_interval_s,
    )
    log_next_run()
    scheduler.start()
    received = signal.sigwait(stop_signals)
    logger.info("received %s, stopping", signal.Signals(received).name)
    scheduler.shutdown(wait=False)
    logger.info("scheduler stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The SQL job store: the ``llm_job_results`` table and every status change as a compare-and-set."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row, make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from repositories.redaction import redact
from repositories.sql_deadline import StatementDeadline, store_unavailable
from repositories.write_batches import WriteBatches

logger = logging.getLogger(__name__)


class JobStatus(StrEnum):
    """The life of a job: ``pending`` → ``processing`` → ``completed`` | ``failed`` | ``cancelled``."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for ``completed``, ``failed`` and ``cancelled``: nothing moves a job out of them."""
        return not TRANSITIONS[self]


class JobKind(StrEnum):
    """What a job does."""

    GENERATE = "generate"
    PREVIEW = "preview"


#: The allowed status changes; a retry sends a processing job back to pending.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.PROCESSING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.PROCESSING: frozenset({JobStatus.PENDING, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

FINAL_STATUSES = tuple(status for status in JobStatus if status.is_final)


def sources_of(target: JobStatus) -> tuple[JobStatus, ...]:
    """Every status from which ``target`` may be reached."""
    return tuple(source for source, targets in TRANSITIONS.items() if target in targets)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC timestamps and always reads them back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of the job store's tables."""


class JobRow(Base):
    """One LLM job: the request, its progress and its outcome."""

    __tablename__ = "llm_job_results"

    job_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    request: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    content: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The attempt token of the delivery running the job: fresh per delivery, it fences every write."""
    lease_message: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The broker message id of that delivery (a redelivered copy of it waits for the lease to go stale)."""
    retries: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    """Provider retries spent: a message re-sent by the reconciler carries this count, not zero."""
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """When the next attempt of a job waiting to retry is due."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_llm_job_results_user_created", "user_id", "created_at"),
        Index("ix_llm_job_results_status_updated", "status", "updated_at"),
        CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')",
            name="ck_llm_job_results_status",
        ),
        CheckConstraint("kind IN ('generate', 'preview')", name="ck_llm_job_results_kind"),
    )


JOBS = cast(Table, JobRow.__table__)
"""The ``llm_job_results`` table, as Core sees it."""


def _param(name: str, column: str) -> Any:
    """A bound parameter typed like ``column`` (so that JSON and UTC timestamps are converted as the column does)."""
    return bindparam(name, type_=JOBS.c[column].type)


class JobStatements:
    """The store's frequent statements, built once per dialect with bound parameters.

    Building a SQLAlchemy statement costs far more than running it on SQLite (a claim took 0.7 ms of CPU
    to build and 0.1 ms to run): the worker's per-job statements are built here once and then only
    executed with their parameters.
    """

    def __init__(self, dialect_name: str) -> None:
        insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
        # Parameters are named p_*: a bound parameter may not share a column's name in an INSERT or UPDATE.
        now = _param("p_now", "updated_at")
        self.insert_pending = (
            insert(JOBS)
            .values(
                job_id=bindparam("p_job_id"),
                user_id=bindparam("p_user_id"),
                kind=bindparam("p_kind"),
                status=str(JobStatus.PENDING),
                request=_param("p_request", "request"),
                content="",
                attempts=0,
                created_at=now,
                updated_at=now,
                enqueued_at=_param("p_enqueued_at", "enqueued_at"),
            )
            .on_conflict_do_nothing()
        )
        self.get = select(*JOBS.columns).where(JOBS.c.job_id == bindparam("p_job_id"))
        self.complete = (
            update(JOBS)
            .where(
                JOBS.c.job_id == bindparam("p_job_id"),
                _status_in(sources_of(JobStatus.COMPLETED)),
                JOBS.c.lease_owner == bindparam("p_owner"),
            )
            .values(
                status=str(JobStatus.COMPLETED),
                updated_at=now,
                finished_at=now,
                content=bindparam("p_content"),
                response=_param("p_response", "response"),
                provider=bindparam("p_provider"),
                model=bindparam("p_model"),
                usage=_param("p_usage", "usage"),
                error=None,
            )
        )
        self.heartbeat = (
            update(JOBS)
            .where(
                JOBS.c.job_id == bindparam("p_job_id"),
                JOBS.c.status == str(JobStatus.PROCESSING),
                JOBS.c.lease_owner == bindparam("p_owner"),
            )
            .values(heartbeat_at=now, updated_at=now)
        )
        self.heartbeat_with_text = self.heartbeat.values(content=bindparam("p_content"))
        self.write_text = (
            update(JOBS)
            .where(
                JOBS.c.job_id == bindparam("b_job"),
                JOBS.c.lease_owner == bindparam("b_owner"),
                JOBS.c.status == str(JobStatus.PROCESSING),
            )
            .values(content=bindparam("b_content"))
        )
        shapes = (False, True)
        self.claims = {
            (count, user, kind): _claim(count_attempt=count, by_user=user, by_kind=kind)
            for count in shapes
            for user in shapes
            for kind in shapes
        }
        """The claim ``UPDATE ... RETURNING`` of each call shape: (count_attempt, by user, by kind)."""
        self.releases = {count: _release_for_retry(count_retry=count) for count in shapes}
        """Back to ``pending`` for another attempt, spending a retry (True) or not."""


def _claim(*, count_attempt: bool, by_user: bool, by_kind: bool) -> Any:
    """The claim ``UPDATE ... RETURNING`` of one call shape (see ``JobStore.claim``)."""
    now = _param("p_now", "updated_at")
    values: dict[str, Any] = {
        "status": str(JobStatus.PROCESSING),
        "lease_owner": bindparam("p_owner"),
        "lease_message": bindparam("p_message_id"),
        "heartbeat_at": now,
        "updated_at": now,
        "started_at": func.coalesce(JOBS.c.started_at, now),
    }
    if count_attempt:
        # A new attempt starts its text afresh: ``content`` always belongs to attempt ``attempts``.
        values["attempts"] = JOBS.c.attempts + 1
        values["content"] = ""
    conditions = [JOBS.c.job_id == bindparam("p_job_id")]
    if by_user:
        conditions.append(JOBS.c.user_id == bindparam("p_user_id"))
    if by_kind:
        conditions.append(JOBS.c.kind == bindparam("p_kind"))
    stale = _param("p_stale", "heartbeat_at")
    return (
        update(JOBS)
        .where(
            *conditions,
            or_(
                JOBS.c.status == str(JobStatus.PENDING),
                (JOBS.c.status == str(JobStatus.PROCESSING))
                & or_(JOBS.c.heartbeat_at.is_(None), JOBS.c.heartbeat_at < stale),
            ),
        )
        .values(values)
        .returning(*JOBS.columns)
    )


def _release_for_retry(*, count_retry: bool) -> Any:
    """Back to ``pending`` for another attempt (see ``JobStore.release_for_retry``)."""
    values: dict[str, Any] = {
        "status": str(JobStatus.PENDING),
        "updated_at": _param("p_now", "updated_at"),
        "error": bindparam("p_error"),
        "content": "",
        "lease_owner": None,
        "heartbeat_at": None,
        "not_before": _param("p_retry_at", "not_before"),
    }
    if count_retry:
        values["retries"] = JOBS.c.retries + 1
    return (
        update(JOBS)
        .where(
            JOBS.c.job_id == bindparam("p_job_id"),
            _status_in(sources_of(JobStatus.PENDING)),
            JOBS.c.lease_owner == bindparam("p_owner"),
        )
        .values(values)
    )


def _status_in(statuses: Iterable[JobStatus]) -> Any:
    """``status = a OR status = b ...``: constants in the statement, not an IN list expanded at each execution."""
    return or_(*(JOBS.c.status == str(status) for status in statuses))


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job as web code sees it."""

    job_id: str
    user_id: str
    kind: JobKind
    status: JobStatus
    content: str
    request: dict[str, Any]
    response: dict[str, Any] | None
    error: str | None
    attempts: int
    provider: str | None
    model: str | None
    usage: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    heartbeat_at: datetime | None
    enqueued_at: datetime | None
    lease_message: str | None = None
    retries: int = 0
    not_before: datetime | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> Job:
        """Copy a result row of ``select(JobRow)`` into an immutable snapshot."""
        values = dict(row._mapping)
        values["kind"] = JobKind(values["kind"])
        values["status"] = JobStatus(values["status"])
        values["content"] = values["content"] or ""
        return cls(**values)


def is_store_outage(error: BaseException) -> bool:
    """True when ``error`` says the store could not be reached or did not answer (not that a query was wrong).

    Connection refused or lost, a pool or statement timeout, a database being restarted: the job waits
    for the store to come back; it never spends a provider retry on it.
    """
    if isinstance(error, Exception) and store_unavailable(error) is not None:
        return True
    return isinstance(error, OperationalError | InterfaceError | PoolTimeoutError | DisconnectionError)


def normalize_database_url(url: str) -> str:
    """Use the psycopg 3 driver for a bare ``postgresql://`` URL (psycopg2 is not a dependency)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_store_engine(
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout_s: float = 3.0,
    statement_timeout_s: float = 5.0,
    idle_transaction_timeout_s: float | None = None,
) -> Engine:
    """Build an engine for SQLite (WAL, busy timeout) or PostgreSQL (pre-ping, sized pool), every wait bounded.

    PostgreSQL: libpq's ``connect_timeout`` and the pool's checkout wait are ``connect_timeout_s``; the
    server's ``statement_timeout`` is ``statement_timeout_s``, and a client-side deadline one second later
    interrupts any call a silent server never answers (``StatementDeadline``). The server also ends a session
    whose transaction sat idle longer than ``idle_transaction_timeout_s`` (default: twice the statement
    timeout, at least 10 s): a worker frozen or hung inside a transaction would otherwise hold that
    transaction's row locks for as long as it stays so, and every other worker's claim of those jobs would
    fail on its statement timeout, over and over. Our transactions are a few statements, and the enqueue's
    a Redis send, long. SQLite waits at most ``statement_timeout_s`` for the write lock. Bound parameters
    (prompts, generated text) never appear in SQLAlchemy's error messages or logs (``hide_parameters``).
    """
    if idle_transaction_timeout_s is None:
        idle_transaction_timeout_s = max(10.0, 2 * statement_timeout_s)
    url = normalize_database_url(url)
    if url.startswith("sqlite"):
        busy_ms = max(1, int(statement_timeout_s * 1000))
        engine = create_engine(
            url,
            connect_args={"timeout": statement_timeout_s, "check_same_thread": False},
            hide_parameters=True,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        return engine
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=connect_timeout_s,
        hide_parameters=True,
        connect_args={
            # libpq counts whole seconds and treats anything below 2 as 2.
            "connect_timeout": max(2, math.ceil(connect_timeout_s)),
            "options": (
                f"-c statement_timeout={int(statement_timeout_s * 1000)}"
                f" -c idle_in_transaction_session_timeout={int(idle_transaction_timeout_s * 1000)}"
            ),
        },
    )
    StatementDeadline(statement_timeout_s + 1.0).install(engine)
    ping_when_idle(engine, idle_s=PING_AFTER_IDLE_S)
    return engine


#: A pooled PostgreSQL connection unused for longer than this is pinged before it is handed out, in seconds.
PING_AFTER_IDLE_S = 1.0


def ping_when_idle(engine: Engine, *, idle_s: float) -> None:
    """Ping a pooled connection at checkout only when it sat unused for more than ``idle_s`` seconds.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: one more round trip for every statement a
    busy worker runs. A connection returned to the pool within the last ``idle_s`` was just working;
    older ones (the database may have restarted since) are pinged, and a failed ping makes the pool
    replace the connection (``DisconnectionError``), as the pre-ping does. A database lost within the
    last ``idle_s`` fails the next statement instead, which the store's callers ride out as an outage,
    and SQLAlchemy then replaces every connection of the pool.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at <= idle_s:
            return  # a new connection, or one in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("pooled connection failed its ping") from exc


_sqlite_write_locks: dict[str, threading.Lock] = {}
_sqlite_write_locks_guard = threading.Lock()


def _sqlite_write_lock(engine: Engine) -> contextlib.AbstractContextManager[object]:
    """A lock that the threads of this process take around a SQLite write transaction; none for PostgreSQL.

    SQLite lets one writer in at a time, and a writer that finds the lock taken polls for it, sleeping
    1, 2, 5, 10 ms and more between tries (its busy handler). A thousand worker threads claiming jobs at
    once, beside the progress writer, spent most of their time asleep there: waiting on a lock of the
    process instead hands the database over the moment it is free. Other processes still meet SQLite's
    busy handler.
    """
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _sqlite_write_locks_guard:
        return _sqlite_write_locks.setdefault(engine.url.render_as_string(), threading.Lock())


#: Leases refreshed by one statement of ``heartbeat_many`` (bounded for SQLite's bind-parameter limit).
HEARTBEAT_BATCH = 500


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One running job's entry in ``heartbeat_many``: its lease owner and, when it grew, its partial text."""

    job_id: str
    owner: str
    content: str | None = None


class JobStore:
    """Reads and writes jobs; every status write is ``UPDATE ... WHERE status IN (allowed)``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sql = JobStatements(engine.dialect.name)
        self._write_lock = _sqlite_write_lock(engine)
        self._batches = (
            WriteBatches(self._writing, is_outage=is_store_outage) if engine.dialect.name == "sqlite" else None
        )
        """On SQLite, claims and outcome writes of concurrent threads go in one transaction per batch: its one
        writer at a time then commits once for many. PostgreSQL runs them side by side on the pool's connections
        (a batch there would hold every row it wrote until its last statement, against the progress writer's)."""

        self._autocommit = (
            engine if engine.dialect.name == "sqlite" else engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        """On PostgreSQL, the engine whose connections run each statement as its own transaction: one round trip
        for a statement alone, where ``BEGIN``, the statement and ``COMMIT`` take three (psycopg sends each)."""

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction; on SQLite, one at a time per engine (see ``_sqlite_write_lock``)."""
        with self._write_lock, self.engine.begin() as connection:
            yield connection

    @contextlib.contextmanager
    def _one_write(self) -> Iterator[Connection]:
        """A connection for one write statement, atomic alone: on PostgreSQL in autocommit, on SQLite ``_writing``."""
        if self._autocommit is self.engine:
            with self._writing() as connection:
                yield connection
        else:
            with self._autocommit.connect() as connection:
                yield connection

    def _reading(self) -> Connection:
        """A connection for reads of one statement each (on PostgreSQL in autocommit: no ``BEGIN``/``ROLLBACK``)."""
        return self._autocommit.connect()

    # -- creation -------------------------------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        user_id: str,
        kind: JobKind,
        request: dict[str, Any],
        now: datetime | None = None,
        enqueued: bool = False,
    ) -> bool:
        """Insert a pending job unless one with this id exists; True when this call created it.

        ``enqueued`` says its message is already in the broker (a worker creating the row of a message).
        """
        with self._one_write() as connection:
            return self._insert_pending(connection, job_id, user_id, kind, request, now or utcnow(), enqueued=enqueued)

    @contextlib.contextmanager
    def creating(self, *, job_id: str, user_id: str, kind: JobKind, request: dict[str, Any]) -> Iterator[bool]:
        """Insert a pending job unless one with this id exists, marked as enqueued, in a transaction that commits
        only when the block ends without an exception (the caller sends the job's message inside it).

        Yields True when this call created the row. A block that raises rolls the insert back. Until the
        commit no other connection sees the row: a worker that receives the message first waits for it
        (PostgreSQL's unique index, SQLite's write lock) or creates it from the message.
        """
        with self._writing() as connection:
            yield self._insert_pending(connection, job_id, user_id, kind, request, utcnow(), enqueued=True)

    def _insert_pending(
        self,
        connection: Connection,
        job_id: str,
        user_id: str,
        kind: JobKind,
        request: dict[str, Any],
        now: datetime,
        *,
        enqueued: bool,
    ) -> bool:
        values = {
            "p_job_id": job_id,
            "p_user_id": user_id,
            "p_kind": str(kind),
            "p_request": request,
            "p_now": now,
            "p_enqueued_at": now if enqueued else None,
        }
        # Without preserve_rowcount, psycopg 3 under SQLAlchemy 2.x reports -1 for this INSERT.
        result = connection.execute(self._sql.insert_pending, values, execution_options={"preserve_rowcount": True})
        return bool(result.rowcount == 1)

    def record_invalid(self, *, job_id: str, user_id: str, kind: JobKind, error: str) -> bool:
        """Fail a job whose message payload is invalid, creating the row if it is missing."""
        self.create(job_id=job_id, user_id=user_id, kind=kind, request={})
        return self._transition(job_id, JobStatus.FAILED, {"error": error}, JobRow.user_id == user_id)

    def mark_enqueued(self, job_id: str) -> None:
        """Record that the job's message reached the broker."""
        with self._one_write() as connection:
            connection.execute(update(JobRow).where(JobRow.job_id == job_id).values(enqueued_at=utcnow()))

    def unsent_before(self, cutoff: datetime, *, limit: int = 100) -> list[Job]:
        """Pending jobs created before ``cutoff`` whose message was never confirmed sent (their sender died)."""
        query = (
            select(JobRow)
            .where(JobRow.status == JobStatus.PENDING, JobRow.enqueued_at.is_(None), JobRow.created_at < cutoff)
            .order_by(JobRow.created_at)
            .limit(limit)
        )
        with self._reading() as connection:
            return [Job.from_row(row) for row in connection.execute(query).all()]

    # -- reads ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self._reading() as connection:
            row = connection.execute(self._sql.get, {"p_job_id": job_id}).first()
        return None if row is None else Job.from_row(row)

    def list_jobs(
        self, *, user_id: str | None = None, statuses: Iterable[JobStatus] = (), limit: int = 100
    ) -> list[Job]:
        """The newest jobs first, optionally of one user and in some statuses."""
        query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if user_id is not None:
            query = query.where(JobRow.user_id == user_id)
        wanted = [str(status) for status in statuses]
        if wanted:
            query = query.where(JobRow.status.in_(wanted))
        with self._reading() as connection:
            rows = connection.execute(query).all()
        return [Job.from_row(row) for row in rows]

    def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs are in each status."""
        with self._reading() as connection:
            rows = connection.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        return {JobStatus(status): count for status, count in rows}

    def oldest_pending(self) -> tuple[str, str, datetime] | None:
        """The job id, user id and ``created_at`` of the oldest pending job, or None when none is pending."""
        query = (
            select(JobRow.job_id, JobRow.user_id, JobRow.created_at)
            .where(JobRow.status == str(JobStatus.PENDING))
            .order_by(JobRow.created_at)
            .limit(1)
        )
        with self._reading() as connection:
            row = connection.execute(query).first()
        return None if row is None else (row.job_id, row.user_id, row.created_at)

    def count_finished_before(self, cutoff: datetime) -> int:
        """How many finished jobs were last updated before ``cutoff``: what the cleanup would delete."""
        query = (
            select(func.count())
            .select_from(JobRow)
            .where(JobRow.status.in_([str(s) for s in FINAL_STATUSES]), JobRow.updated_at < cutoff)
        )
        with self._reading() as connection:
            return int(connection.execute(query).scalar_one())

    # -- status changes -------------------------------------------------------------------------

    def _transition(self, job_id: str, target: JobStatus, values: dict[str, Any], *conditions: Any) -> bool:
        """Compare-and-set the status to ``target``; True when this call made the change."""
        now = utcnow()
        values = {"status": str(target), "updated_at": now, **values}
        if isinstance(values.get("error"), str):
            values["error"] = redact(values["error"])
        if target.is_final:
            values.setdefault("finished_at", now)
        statement = (
            update(JobRow)
            .where(JobRow.job_id == job_id, JobRow.status.in_([str(s) for s in sources_of(target)]), *conditions)
            .values(values)
        )
        with self._one_write() as connection:
            changed = connection.execute(statement).rowcount == 1
        if changed:
            logger.debug("job moved to %s", target, extra={"job_id": job_id, "status": str(target)})
        return changed

    def claim(
        self,
        job_id: str,
        *,
        owner: str,
        lease_s: float,
        message_id: str | None = None,
        user_id: str | None = None,
        kind: JobKind | None = None,
        count_attempt: bool = True,
    ) -> Job | None:
        """Move a job to ``processing`` for ``owner`` (a fresh attempt token); None when it is not ours to run.

        A pending job is claimed; a processing job only once its heartbeat is older than ``lease_s``
        (its worker died or froze), never while another attempt keeps it alive, even by a redelivered
        copy of the same message. ``message_id`` is recorded as ``lease_message``. With ``user_id``
        and ``kind``, only a job of that user and kind is claimed.
        """
        now = utcnow()
        statement = self._sql.claims[(count_attempt, user_id is not None, kind is not None)]
        params = {
            "p_job_id": job_id,
            "p_owner": owner,
            "p_message_id": message_id,
            "p_now": now,
            "p_stale": now - timedelta(seconds=lease_s),
            "p_user_id": user_id,
            "p_kind": None if kind is None else str(kind),
        }
        if self._batches is None:
            with self._one_write() as connection:
                row = connection.execute(statement, params).first()
        else:
            row = self._batches.write(lambda connection: connection.execute(statement, params).first())
        return None if row is None else Job.from_row(row)

    def heartbeat(self, job_id: str, *, owner: str, content: str | None = None) -> bool:
        """Refresh the lease and, when given, the partial text; False once the job is no longer ours."""
        statement = self._sql.heartbeat if content is None else self._sql.heartbeat_with_text
        params = {"p_job_id": job_id, "p_owner": owner, "p_now": utcnow(), "p_content": content}
        with self._one_write() as connection:
            return bool(connection.execute(statement, params).rowcount == 1)

    def heartbeat_many(self, beats: Sequence[Heartbeat]) -> set[str]:
        """Refresh many leases (and their partial texts) in one transaction; the owners that no longer hold theirs.

        One statement refreshes every lease and returns the owners whose job is still theirs; one
        ``executemany`` writes the new texts of those. A worker process calls it once per progress
        interval for all of its running jobs, instead of one transaction per job.
        """
        if not beats:
            return set()
        now = utcnow()
        held: set[str] = set()
        with self._writing() as connection:
            for start in range(0, len(beats), HEARTBEAT_BATCH):
                chunk = beats[start : start + HEARTBEAT_BATCH]
                refresh = (
                    update(JobRow)
                    .where(
                        JobRow.status == JobStatus.PROCESSING,
                        JobRow.job_id.in_([beat.job_id for beat in chunk]),
                        JobRow.lease_owner.in_([beat.owner for beat in chunk]),
                    )
                    .values(heartbeat_at=now, updated_at=now)
                    .returning(JobRow.job_id, JobRow.lease_owner)
                )
                pairs = {(beat.job_id, beat.owner) for beat in chunk}
                held.update(str(owner) for job_id, owner in connection.execute(refresh) if (job_id, owner) in pairs)
            texts = [
                {"b_job": beat.job_id, "b_owner": beat.owner, "b_content": beat.content}
                for beat in beats
                if beat.content is not None and beat.owner in held
            ]
            if texts:
                connection.execute(self._sql.write_text, texts)
        return {beat.owner for beat in beats} - held

    def write_texts(self, beats: Sequence[Heartbeat]) -> None:
        """Write the partial texts of many running jobs in one transaction, each only while its lease is held.

        No lease is refreshed and none is reported lost: ``heartbeat_many`` does that, once per interval.
        """
        texts = [
            {"b_job": beat.job_id, "b_owner": beat.owner, "b_content": beat.content}
            for beat in beats
            if beat.content is not None
        ]
        if texts:
            with self._writing() as connection:
                connection.execute(self._sql.write_text, texts)

    def complete(
        self,
        job_id: str,
        *,
        owner: str,
        content: str,
        response: dict[str, Any],
        provider: str | None,
        model: str | None,
        usage: dict[str, Any] | None,
    ) -> bool:
        """Store the final answer; False when the job was cancelled or taken over meanwhile."""
        params = {
            "p_job_id": job_id,
            "p_owner": owner,
            "p_now": utcnow(),
            "p_content": content,
            "p_response": response,
            "p_provider": provider,
            "p_model": model,
            "p_usage": usage,
        }
        return self._changed(self._sql.complete, params, JobStatus.COMPLETED)

    def _changed(self, statement: Any, params: dict[str, Any], target: JobStatus) -> bool:
        """Run a prebuilt compare-and-set to ``target`` (with other threads' writes); True when it changed the row."""
        if self._batches is None:
            with self._one_write() as connection:
                changed = connection.execute(statement, params).rowcount == 1
        else:
            changed = self._batches.write(lambda connection: connection.execute(statement, params).rowcount == 1)
        if changed:
            logger.debug("job moved to %s", target, extra={"job_id": params["p_job_id"], "status": str(target)})
        return bool(changed)

    def release_for_retry(
        self, job_id: str, *, owner: str, error: str, retry_at: datetime | None = None, count_retry: bool = False
    ) -> bool:
        """Send a processing job back to pending for another attempt, dropping the failed attempt's text.

        ``count_retry`` spends one of the job's provider retries; ``retry_at`` is when the next attempt is due.
        """
        params = {
            "p_job_id": job_id,
            "p_owner": owner,
            "p_now": utcnow(),
            "p_error": redact(error),
            "p_retry_at": retry_at,
        }
        return self._changed(self._sql.releases[count_retry], params, JobStatus.PENDING)

    def fail(self, job_id: str, *, error: str, owner: str | None = None) -> bool:
        """Fail a pending or processing job (only the owner's, when ``owner`` is given)."""
        conditions = [] if owner is None else [JobRow.lease_owner == owner]
        return self._transition(job_id, JobStatus.FAILED, {"error": error}, *conditions)

    def note_waiting(self, job_id: str, note: str) -> bool:
        """Say in a pending job's ``error`` why it waits (its provider lane, say); the status is not touched."""
        statement = (
            update(JobRow)
            .where(JobRow.job_id == job_id, JobRow.status == JobStatus.PENDING)
            .values(error=redact(note), updated_at=utcnow())
        )
        with self._one_write() as connection:
            return connection.execute(statement).rowcount == 1

    def cancel(self, job_id: str, *, user_id: str) -> bool:
        """Cancel the user's pending or processing job; False if unknown, another user's, or finished."""
        return self._transition(job_id, JobStatus.CANCELLED, {}, JobRow.user_id == user_id)

    def keep_partial(self, job_id: str, *, owner: str, content: str) -> None:
        """Save the text streamed before a cancel took effect, without touching the status."""
        with self._one_write() as connection:
            connection.execute(
                update(JobRow)
                .where(
                    JobRow.job_id == job_id,
                    JobRow.status == JobStatus.CANCELLED,
                    JobRow.lease_owner == owner,
                )
                .values(content=content)
            )

    # -- reconciliation -------------------------------------------------------------------------

    def stranded_candidates(self, *, pending_before: datetime, stale_before: datetime, limit: int = 500) -> list[Job]:
        """Jobs that may have lost their way to completion, oldest first.

        Pending jobs untouched (and not waiting for a due retry) since ``pending_before``, and processing
        jobs whose heartbeat is older than ``stale_before``. Whether their message still lives in the
        broker is for the caller to check.
        """
        query = (
            select(JobRow)
            .where(
                or_(
                    (JobRow.status == JobStatus.PENDING)
                    & (func.coalesce(JobRow.not_before, JobRow.updated_at) < pending_before)
                    & (JobRow.updated_at < pending_before),
                    (JobRow.status == JobStatus.PROCESSING)
                    & or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale_before),
                )
            )
            .order_by(JobRow.updated_at)
            .limit(limit)
        )
        with self._reading() as connection:
            return [Job.from_row(row) for row in connection.execute(query).all()]

    def take_for_resend(self, job: Job, *, note: str) -> bool:
        """Mark ``job`` (a snapshot from ``stranded_candidates``) as re-sent; True for the one caller that wins.

        A compare-and-set against the snapshot: a job that moved meanwhile (claimed, heart-beaten, retried)
        is left alone, and of several reconcilers racing only one re-sends. A processing job whose attempt
        is gone goes back to ``pending``, dropping that attempt's text.
        """
        now = utcnow()
        if job.status is JobStatus.PENDING:
            statement = (
                update(JobRow)
                .where(
                    JobRow.job_id == job.job_id,
                    JobRow.status == JobStatus.PENDING,
                    JobRow.updated_at == job.updated_at,
                )
                .values(updated_at=now, enqueued_at=now)
            )
        elif job.status is JobStatus.PROCESSING:
            same_heartbeat = (
                JobRow.heartbeat_at.is_(None) if job.heartbeat_at is None else JobRow.heartbeat_at == job.heartbeat_at
            )
            statement = (
                update(JobRow)
                .where(
                    JobRow.job_id == job.job_id,
                    JobRow.status == JobStatus.PROCESSING,
                    JobRow.lease_owner.is_(None) if job.lease_owner is None else JobRow.lease_owner == job.lease_owner,
                    same_heartbeat,
                )
                .values(
                    status=str(JobStatus.PENDING),
                    lease_owner=None,
                    heartbeat_at=None,
                    content="",
                    error=note,
                    not_before=None,
                    updated_at=now,
                    enqueued_at=now,
                )
            )
        else:
            return False
        with self._one_write() as connection:
            return connection.execute(statement).rowcount == 1

    def count_stale_processing(self, stale_before: datetime) -> int:
        """How many processing jobs have a heartbeat older than ``stale_before`` (their attempt is gone)."""
        query = (
            select(func.count())
            .select_from(JobRow)
            .where(
                JobRow.status == JobStatus.PROCESSING,
                or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale_before),
            )
        )
        with self._reading() as connection:
            return int(connection.execute(query).scalar_one())

    # -- retention ------------------------------------------------------------------------------

    def finished_before(self, cutoff: datetime, *, limit: int) -> Sequence[str]:
        """Ids of finished jobs last updated before ``cutoff``: what the cleanup would delete."""
        query = (
            select(JobRow.job_id)
            .where(JobRow.status.in_([str(s) for s in FINAL_STATUSES]), JobRow.updated_at < cutoff)
            .order_by(JobRow.updated_at)
            .limit(limit)
        )
        with self._reading() as connection:
            return list(connection.execute(query).scalars())

    def delete_finished_before(self, cutoff: datetime, *, batch_size: int = 1000) -> int:
        """Delete finished jobs last updated before ``cutoff`` in batches; return how many went."""
        total = 0
        while True:
            ids = self.finished_before(cutoff, limit=batch_size)
            if not ids:
                return total
            with self._one_write() as connection:
                total += connection.execute(
                    delete(JobRow).where(JobRow.job_id.in_(ids), JobRow.status.in_([str(s) for s in FINAL_STATUSES]))
                ).rowcount
            if len(ids) < batch_size:
                return total

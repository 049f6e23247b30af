"""The web API router: jobs of the caller's user, and each job's resumable event stream.

The host app supplies identity as a callable ``Request -> user_id`` (sync or async); every route is
scoped to that user and another user's job answers 404.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, field_validator
from sse_starlette import EventSourceResponse

import actors
from actors.payloads import GenerationParams, JobId
from actors.queue import current
from admission.leases import UserLoad
from repositories.store import Job, JobKind, JobStatus
from web.feed import FeedHub, Position, Snapshot, job_events, job_json
from web.tokens import StreamTokens

logger = logging.getLogger(__name__)

Identity = Callable[[Request], str | Awaitable[str]]
"""Turns a request into the caller's ``user_id``; raises ``HTTPException(401)`` when there is none."""

STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {".js": "text/javascript", ".html": "text/html", ".css": "text/css"}
_JOB_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

#: Seconds between keep-alive comments on an idle event stream.
PING_S = 15


def _no_nul(value: Any, where: str) -> None:
    """Reject NUL characters anywhere in ``value`` (PostgreSQL cannot store them), naming the field."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where or 'value'}: must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_nul(item, f"{where}.{index}")


Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]


class GenerationBody(BaseModel):
    """``POST /jobs``: the parameters of ``enqueue_generation`` and an optional idempotency ``job_id``."""

    model_config = ConfigDict(extra="forbid")

    params: GenerationParams
    job_id: JobId | None = None

    @field_validator("params", mode="before")
    @classmethod
    def _params_have_no_nul(cls, value: Any) -> Any:
        _no_nul(value, "")
        return value


class PreviewBody(BaseModel):
    """``POST /previews``: the title and content of a tile, and an optional idempotency ``job_id``."""

    model_config = ConfigDict(extra="forbid")

    title: Annotated[Text, StringConstraints(max_length=1_000)]
    content: Annotated[Text, StringConstraints(max_length=500_000)]
    job_id: JobId | None = None


def validation_error(error: ValidationError, prefix: tuple[str, ...]) -> RequestValidationError:
    """A 422 naming the fields of ``error`` below ``prefix`` (like FastAPI's own), without echoing input."""
    details = [
        {"loc": [*prefix, *item["loc"]], "msg": item["msg"], "type": item["type"]}
        for item in error.errors(include_input=False, include_url=False)
    ]
    return RequestValidationError(details)


class UserLoads:
    """``actors.user_loads()`` (a scan of the throttle's keys) read at most once per ``max_age_s`` per process."""

    def __init__(self, max_age_s: float = 1.0) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = -math.inf
        self._loads: list[UserLoad] = []

    def __call__(self) -> list[UserLoad]:
        """The loads, at most ``max_age_s`` old; empty when Redis cannot be read."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.max_age_s:
                try:
                    self._loads = actors.user_loads()
                except Exception:
                    logger.warning("user loads unavailable", exc_info=True)
                    self._loads = []
                self._read_at = time.monotonic()
            return self._loads


user_loads = UserLoads()


def snapshot_of(job: Job) -> Snapshot:
    """The job with its status for the event stream: a pending job whose user has parked jobs is ``waiting``."""
    if job.status is JobStatus.PENDING:
        actor = "generate_llm_response" if job.kind is JobKind.GENERATE else "generate_preview"
        loads = [load for load in user_loads() if load.user_id == job.user_id and load.actor == actor]
        if any(load.waiting for load in loads):
            running = sum(load.running for load in loads)
            return Snapshot(job, "waiting", f"throttled: {running} of this user's jobs are running")
        return Snapshot(job, "pending", job.error or "queued")
    if job.status is JobStatus.PROCESSING:
        return Snapshot(job, "processing", f"attempt {job.attempts}")
    return Snapshot(job, str(job.status), job.error or "")


class JobStreams:
    """What the routes share: the stream tokens and this process's feeds (built inside the event loop)."""

    def __init__(self, *, tokens: StreamTokens, redis_url: str | None, ping_s: float = PING_S) -> None:
        self.tokens = tokens
        self.redis_url = redis_url
        self.ping_s = ping_s
        self._hub: FeedHub | None = None

    def hub(self) -> FeedHub:
        """The feed hub of this process."""
        if self._hub is None:
            self._hub = FeedHub(self.redis_url)
        return self._hub

    async def close(self) -> None:
        """Stop the feeds."""
        if self._hub is not None:
            await self._hub.close()
            self._hub = None

    def response(self, job_id: str, last_event_id: str | None) -> EventSourceResponse:
        """The job's event stream, resuming after ``last_event_id``."""
        start = Position.parse(last_event_id)

        async def load() -> Snapshot | None:
            return await asyncio.to_thread(_load_snapshot, job_id)

        async def events() -> Any:
            async with self.hub().watch(job_id, load) as feed:
                async for event in job_events(feed, start):
                    yield event

        return EventSourceResponse(events(), ping=self.ping_s, headers={"Cache-Control": "no-store"})


def _load_snapshot(job_id: str) -> Snapshot | None:
    job = actors.get_job(job_id)
    return None if job is None else snapshot_of(job)


def known_job_id(job_id: str) -> bool:
    """Whether ``job_id`` could be a job id at all (anything else is simply not found)."""
    return bool(_JOB_ID.match(job_id))


def static_route(router: APIRouter) -> None:
    """``GET /static/{name}``: the JS client and the pages, from ``web/static``."""

    @router.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> FileResponse:
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


def build_router(
    identity: Identity,
    *,
    tokens: StreamTokens | None = None,
    redis_url: str | None = None,
    ping_s: float = PING_S,
    streams: JobStreams | None = None,
) -> APIRouter:
    """The jobs API of the contract's "Web API" table, scoped to the user ``identity`` returns.

    ``redis_url`` is where the workers' live text is (``REDIS_URL`` by default); ``tokens`` signs the
    per-job stream tokens (``WEB_STREAM_SECRET``). The router also serves ``/static/client.js``.
    """
    streams = streams or JobStreams(
        tokens=tokens or default_tokens(),
        redis_url=redis_url if redis_url is not None else current().settings.redis_url,
        ping_s=ping_s,
    )
    router = APIRouter()

    async def current_user(request: Request) -> str:
        user_id = identity(request)
        if inspect.isawaitable(user_id):
            user_id = await user_id
        if not isinstance(user_id, str) or not user_id or len(user_id) > 255 or "\x00" in user_id:
            raise HTTPException(401, "not signed in")
        return user_id

    def own_job(job_id: str, user_id: str) -> Job:
        job = actors.get_job(job_id, user_id=user_id) if known_job_id(job_id) else None
        if job is None:
            raise HTTPException(404, "job not found")
        return job

    def with_token(job: Job) -> dict[str, Any]:
        return job_json(job, stream_token=streams.tokens.issue(job.job_id, job.user_id))

    @router.post("/jobs", status_code=201)
    def create_generation(body: GenerationBody, user_id: str = Depends(current_user)) -> dict[str, Any]:
        """Queue a generation; 201 with the job (and a stream token for its events)."""
        try:
            job_id = actors.enqueue_generation(user_id, body.params, job_id=body.job_id)
        except ValidationError as exc:
            raise validation_error(exc, ("body",)) from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return with_token(own_job(job_id, user_id))

    @router.post("/previews", status_code=201)
    def create_preview(body: PreviewBody, user_id: str = Depends(current_user)) -> dict[str, Any]:
        """Queue a tile preview; 201 with the job."""
        try:
            job_id = actors.enqueue_preview(user_id, body.title, body.content, job_id=body.job_id)
        except ValidationError as exc:
            raise validation_error(exc, ("body",)) from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return with_token(own_job(job_id, user_id))

    @router.get("/jobs")
    def list_jobs(
        user_id: str = Depends(current_user),
        status: Annotated[JobStatus | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[dict[str, Any]]:
        """The caller's jobs, newest first, optionally in one status."""
        store = current().store
        jobs = store.list_jobs(user_id=user_id, statuses=[status] if status else (), limit=limit)
        return [job_json(job) for job in jobs]

    @router.get("/jobs/{job_id}")
    def read_job(job_id: str, user_id: str = Depends(current_user)) -> dict[str, Any]:
        """The caller's job; 404 when unknown or another user's."""
        return with_token(own_job(job_id, user_id))

    @router.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str, user_id: str = Depends(current_user)) -> dict[str, bool]:
        """Cancel the caller's job: ``cancelled`` is True when it was pending or processing."""
        own_job(job_id, user_id)
        return {"cancelled": actors.cancel_job(job_id, user_id)}

    @router.get("/jobs/{job_id}/events")
    async def events(
        request: Request,
        job_id: str,
        token: Annotated[str | None, Query(max_length=500)] = None,
        last_event_id: Annotated[str | None, Query(max_length=40)] = None,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> EventSourceResponse:
        """The job's events (``text``, ``status``, ``reset``, ``done``), resuming after ``Last-Event-ID``.

        A ``token`` from the job's JSON opens the stream without the app's own identity.
        """
        if token is not None:
            user_id = streams.tokens.user_of(token, job_id)
            if user_id is None:
                raise HTTPException(401, "stream token invalid or expired")
        else:
            user_id = await current_user(request)
        await asyncio.to_thread(own_job, job_id, user_id)
        return streams.response(job_id, last_event_id_header or last_event_id)

    static_route(router)
    return router


def default_tokens() -> StreamTokens:
    """Stream tokens keyed by ``WEB_STREAM_SECRET`` (a random key of this process when it is unset)."""
    settings = current().settings
    secret = settings.web_stream_secret.get_secret_value().encode() if settings.web_stream_secret else None
    if secret is None:
        logger.warning("WEB_STREAM_SECRET is not set: stream tokens are valid only in this web process")
    return StreamTokens(secret, ttl_s=settings.web_stream_token_ttl_s)

"""The live operator page: every user's jobs, per-user loads, each job's text stream, cancel, and a prompt form.

Mount it only behind the host app's operator check (``authorize``): it sees and cancels every job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, StringConstraints

import actors
from actors.payloads import UserId
from actors.queue import current
from repositories.store import Job, utcnow
from web.api import STATIC_DIR, JobStreams, known_job_id, snapshot_of, user_loads

Authorize = Callable[[Request], Awaitable[None] | None]
"""Raises ``HTTPException(403)`` unless the request is an operator's."""


class PromptBody(BaseModel):
    """The operator form: a prompt sent as one user message to ``model`` for ``user_id``."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=100_000, pattern=r"^[^\x00]*$")]
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    max_tokens: int | None = None


def _elapsed_s(job: Job, now: datetime) -> float | None:
    if job.started_at is None:
        return None
    return round(((job.finished_at or now) - job.started_at).total_seconds(), 2)


def operator_row(job: Job, now: datetime) -> dict[str, Any]:
    """One line of the operator table (no text: the page streams it on demand)."""
    snapshot = snapshot_of(job) if not job.status.is_final else None
    usage = job.usage or {}
    return {
        "job_id": job.job_id,
        "user_id": job.user_id,
        "kind": str(job.kind),
        "status": snapshot.status if snapshot else str(job.status),
        "attempts": job.attempts,
        "provider": job.provider or (job.response or {}).get("provider"),
        "model": job.model or job.request.get("model"),
        "tokens": usage.get("completion_tokens"),
        "chars": len(job.content),
        "elapsed_s": _elapsed_s(job, now),
        "error": job.error,
        "created_at": job.created_at.isoformat(),
    }


def build_operator_router(
    streams: JobStreams, *, authorize: Authorize, default_model: str, limit: int = 100
) -> APIRouter:
    """``/operator`` (the page) and ``/operator/api/...`` (its state, streams, cancel and prompt form)."""

    async def operator(request: Request) -> None:
        allowed = authorize(request)
        if allowed is not None:
            await allowed

    router = APIRouter(prefix="/operator", dependencies=[Depends(operator)])

    @router.get("", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "operator.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/api/state")
    def state() -> dict[str, Any]:
        """The newest jobs of every user and the per-user running and waiting counts."""
        now = utcnow()
        jobs = current().store.list_jobs(limit=limit)
        loads = [
            {"actor": load.actor, "user_id": load.user_id, "running": load.running, "waiting": load.waiting}
            for load in user_loads()
        ]
        return {"jobs": [operator_row(job, now) for job in jobs], "loads": loads, "default_model": default_model}

    @router.post("/api/jobs", status_code=201)
    def submit(body: PromptBody) -> dict[str, str]:
        """Queue the prompt for ``user_id`` on the configured model."""
        params: dict[str, Any] = {
            "model": body.model or default_model,
            "messages": [{"role": "user", "content": body.prompt}],
        }
        if body.max_tokens is not None:
            params["max_tokens"] = body.max_tokens
        try:
            job_id = actors.enqueue_generation(body.user_id, params)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"job_id": job_id}

    def job_or_404(job_id: str) -> Job:
        job = actors.get_job(job_id) if known_job_id(job_id) else None
        if job is None:
            raise HTTPException(404, "job not found")
        return job

    @router.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, bool]:
        """Cancel any user's job."""
        job = job_or_404(job_id)
        return {"cancelled": actors.cancel_job(job_id, job.user_id)}

    @router.get("/api/jobs/{job_id}/events")
    async def events(
        job_id: str,
        last_event_id: str | None = None,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Any:
        """Any job's event stream, as ``/jobs/{job_id}/events`` serves it to its user."""
        await asyncio.to_thread(job_or_404, job_id)
        return streams.response(job_id, last_event_id_header or last_event_id)

    return router

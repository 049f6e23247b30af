"""The standalone web app: the jobs API, the static JS client and (for local use) the operator page."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse

from actors.queue import current
from settings import ConfigurationError
from web.api import PING_S, Identity, JobStreams, build_router, default_tokens
from web.operator import Authorize, build_operator_router

logger = logging.getLogger(__name__)

DEV_USER_HEADER = "X-User-Id"


def header_identity(request: Request) -> str:
    """Development identity: whatever ``X-User-Id`` says (anyone can claim to be anyone)."""
    user_id = request.headers.get(DEV_USER_HEADER)
    if not user_id:
        raise HTTPException(401, f"not signed in: send the {DEV_USER_HEADER} header (development identity)")
    return user_id


def allow_everyone(request: Request) -> None:
    """Development operator check: everyone is an operator."""


def create_app(
    identity: Identity | None = None,
    *,
    operator: Authorize | None = None,
    default_model: str | None = None,
    redis_url: str | None = None,
    ping_s: float = PING_S,
) -> FastAPI:
    """A FastAPI app serving the jobs API with ``identity``, and the operator page when ``operator`` allows.

    Without ``identity`` it needs ``WEB_DEV_IDENTITY=true``: the ``X-User-Id`` header names the user
    and the operator page is open to everyone. That is for local use only and logs a warning.
    """
    settings = current().settings
    if identity is None:
        if not settings.web_dev_identity:
            raise ConfigurationError(
                "the web app needs an identity: pass create_app(identity=...) or set WEB_DEV_IDENTITY=true "
                "(development only)"
            )
        logger.warning(
            "WEB_DEV_IDENTITY is on: the %s header names the user and the operator page is open; never in production",
            DEV_USER_HEADER,
        )
        identity = header_identity
        operator = operator or allow_everyone
    streams = JobStreams(
        tokens=default_tokens(),
        redis_url=redis_url if redis_url is not None else settings.redis_url,
        ping_s=ping_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await streams.close()

    app = FastAPI(title="LLM jobs", lifespan=lifespan)
    app.include_router(build_router(identity, streams=streams))
    if operator is not None:
        app.include_router(
            build_operator_router(streams, authorize=operator, default_model=default_model or settings.preview_model)
        )

        @app.get("/", include_in_schema=False)
        def home() -> Any:
            return RedirectResponse("operator")

    return app

"""The web side: a FastAPI router for the jobs API with resumable event streams, an app factory, a JS client.

Host app::

    from web import build_router
    app.include_router(build_router(identity=lambda request: request.state.user_id))

Standalone (development): ``WEB_DEV_IDENTITY=true python -m web --port 8000``.
"""

from __future__ import annotations

from web.api import build_router
from web.app import create_app
from web.tokens import StreamTokens

__all__ = ["StreamTokens", "build_router", "create_app"]

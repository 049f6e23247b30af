"""Web fixtures: the real app (uvicorn on loopback) in front of the session's real worker and stores."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.web.support import WebServer, header_user
from web.app import allow_everyone, create_app


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[WebServer]:
    """The web app with the tests' header identity and the operator page, served on a loopback port."""
    app = create_app(identity=header_user, operator=allow_everyone, default_model="test/model", ping_s=1)
    with WebServer(app) as server:
        yield server


@pytest.fixture
def http(web: WebServer) -> Iterator[httpx.Client]:
    """An HTTP client of the web app."""
    with httpx.Client(base_url=web.url, timeout=30) as client:
        yield client

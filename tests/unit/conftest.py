"""The unit tier runs with no Redis, no PostgreSQL, no RabbitMQ and no network: StubBroker, memory stores, SQLite.

Two guards keep it so. The ``services`` fixture is overridden with a failure, so a unit test that asks for
real services (directly, or through ``postgres_database`` or the ``store`` fixture's PostgreSQL case) fails
at once. And a socket opened in a unit test may not connect to the ports of Redis, PostgreSQL or RabbitMQ,
whatever the URL. ``make unit`` also points the test URLs at closed ports (see the Makefile), which catches
what neither guard sees, such as libpq's own connections.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

SERVICE_PORTS = {6379: "Redis", 5432: "PostgreSQL", 5672: "RabbitMQ"}


@pytest.fixture(scope="session")
def services() -> None:
    """No real services in the unit tier."""
    pytest.fail("a unit test asked for real Redis/PostgreSQL: it belongs in tests/integration", pytrace=False)


def _service_of(address: Any) -> str | None:
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
        return SERVICE_PORTS.get(address[1])
    return None


@pytest.fixture(autouse=True)
def no_service_connections(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse any TCP connect to a service port during each unit test, and fail the test that tried (even when
    the code under test shrugs the refused connection off)."""
    connect = socket.socket.connect
    connect_ex = socket.socket.connect_ex
    attempts: list[str] = []

    def refused(address: Any) -> OSError:
        attempts.append(f"{_service_of(address)} at {address!r}")
        return ConnectionRefusedError(f"unit tests use no {_service_of(address)}: connect to {address!r} refused")

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if _service_of(address):
            raise refused(address)
        connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
        if _service_of(address):
            raise refused(address)
        return connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    yield
    if attempts:
        pytest.fail(f"a unit test tried to connect to {', '.join(attempts)}: it belongs in tests/integration")

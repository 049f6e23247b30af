"""Web-tier fixtures: the live text writer and the stream reader run against real Redis."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def tier_services(services: None) -> None:
    """Every test of this tier has real Redis and PostgreSQL."""

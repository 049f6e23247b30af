"""Drive a provider's stream the way a worker does (a fresh event loop per job), for provider tests."""

from __future__ import annotations

import asyncio

import pytest

from repositories.chat import ChatProvider, ChatRequest, StreamEvent
from repositories.errors import ProviderError


def collect(provider: ChatProvider, request: ChatRequest) -> list[StreamEvent]:
    """Run one stream to its end in a fresh event loop and return its events."""

    async def run() -> list[StreamEvent]:
        return [event async for event in provider.stream(request)]

    return asyncio.run(run())


def failure_of(provider: ChatProvider, request: ChatRequest) -> tuple[list[StreamEvent], ProviderError]:
    """Run one stream that must fail; return the events before the failure and the error."""
    events: list[StreamEvent] = []

    async def run() -> None:
        async for event in provider.stream(request):
            events.append(event)

    with pytest.raises(ProviderError) as raised:
        asyncio.run(run())
    return events, raised.value

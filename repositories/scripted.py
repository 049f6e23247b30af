"""An in-memory provider that replays scripted outcomes: the twin of the real providers for unit tests."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from repositories.chat import ChatRequest, Finished, StreamEvent, TextDelta, Usage
from repositories.errors import ProviderError


@dataclass(frozen=True)
class ScriptedReply:
    """One scripted outcome: text pieces streamed with a delay, then either an error or a finish."""

    pieces: tuple[str, ...] = ("Hello", ", ", "world")
    delay_s: float = 0.0
    error_after: int | None = None
    error: ProviderError | None = None
    finish_reason: str = "stop"
    usage: Usage | None = field(default_factory=lambda: Usage(5, 3))


class ScriptedProvider:
    """Replays ``ScriptedReply`` objects in order (the last one repeats) and records every request."""

    def __init__(self, replies: Iterable[ScriptedReply] = (), *, name: str = "scripted") -> None:
        self._replies = deque(replies) or deque([ScriptedReply()])
        self._name = name
        self.requests: list[ChatRequest] = []
        self.closed_early = 0

    @property
    def name(self) -> str:
        """The provider name stored in job responses."""
        return self._name

    def _next(self) -> ScriptedReply:
        return self._replies.popleft() if len(self._replies) > 1 else self._replies[0]

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Yield the next scripted reply's pieces, then raise its error or finish."""
        self.requests.append(request)
        reply = self._next()
        finished = False
        try:
            for index, piece in enumerate(reply.pieces):
                if reply.error is not None and reply.error_after == index:
                    raise reply.error
                if reply.delay_s:
                    await asyncio.sleep(reply.delay_s)
                yield TextDelta(piece)
            if reply.error is not None:
                raise reply.error
            finished = True
            yield Finished(model=request.model, finish_reason=reply.finish_reason, usage=reply.usage)
        finally:
            if not finished:
                self.closed_early += 1

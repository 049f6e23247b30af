"""The provider-neutral chat request, stream events and the one Protocol every provider implements."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

#: Characters neither job store can hold: NUL (PostgreSQL text and JSONB) and lone surrogates (not UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(value: str) -> str:
    """``value`` unchanged, or ``ValueError`` when it holds a character the job stores cannot keep."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return value
    if found.group() == "\x00":
        raise ValueError("must not contain NUL characters (\\x00)")
    raise ValueError("must not contain unpaired surrogate characters")


#: A string that both stores can hold; the error names the field.
StorableText = Annotated[str, AfterValidator(storable_text)]

ModelName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(storable_text)
]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: Annotated[StorableText, StringConstraints(max_length=1_000_000)]


class ChatRequest(BaseModel):
    """Validated generation parameters: what web code passes as ``params`` and what a provider receives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: StorableText | Annotated[list[StorableText], Field(max_length=16)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None

    @field_validator("messages")
    @classmethod
    def _has_a_non_system_message(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if all(message.role == "system" for message in messages):
            raise ValueError("needs at least one user or assistant message")
        return messages

    def sampling_options(self) -> dict[str, Any]:
        """Return the optional sampling fields that were set, as a plain dict."""
        return self.model_dump(exclude={"model", "messages"}, exclude_none=True)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one completion."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """The ``usage`` object stored in a job's response."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text, in arrival order."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a successful stream: who answered, why it stopped, and what it cost."""

    model: str
    finish_reason: str | None
    usage: Usage | None
    cost: float | None = None


StreamEvent = TextDelta | Finished


class ChatProvider(Protocol):
    """A model provider: streams one chat completion, raising ``ProviderError`` subclasses on failure.

    A provider never retries on its own; leaving the iteration early closes the connection.
    """

    @property
    def name(self) -> str:
        """The provider's name as stored in job responses (``openrouter``, ``anthropic``, ...)."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Yield ``TextDelta`` events as text arrives, then exactly one ``Finished`` event."""
        ...


Client = TypeVar("Client")


class LoopClients(Generic[Client]):
    """HTTP clients of one event loop, made on first use: a provider's connection pools (keep-alive).

    A client and its pooled connections belong to the loop that opened them, so the worker's one stream
    loop (``actors.stream_loop``) gets the clients for all of its jobs. ``close_clients`` closes every
    client of a loop before the loop ends. With ``keep_alive`` off, ``lease`` builds a client for each
    use and closes it after (a connection per job).

    A lease takes the client with the fewest requests in flight, and a new client once every client has
    ``requests_per_client`` in flight (up to ``max_clients``). httpcore's pool looks through all of its
    connections each time a request starts or ends; a thousand streams in one pool cost it a million
    checks to start, and a few dozen pools of a few dozen connections cost a few thousand. Requests made
    one after another all go to the first client, and so reuse its one connection.
    """

    def __init__(
        self,
        build: Callable[[], Client],
        close: Callable[[Client], Awaitable[None]],
        *,
        keep_alive: bool = True,
        requests_per_client: int = 32,
        max_clients: int = 64,
    ) -> None:
        self._build = build
        self._close = close
        self._keep_alive = keep_alive
        self.requests_per_client = requests_per_client
        self.max_clients = max_clients

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Client]:
        """The client for one request: the running loop's least busy one, or with ``keep_alive`` off a fresh one."""
        if not self._keep_alive:
            client = self._build()
            try:
                yield client
            finally:
                await self._close(client)
            return
        pooled = self._pooled()
        pooled.in_flight += 1
        try:
            yield pooled.client
        finally:
            pooled.in_flight -= 1

    def get(self) -> Client:
        """The running loop's least busy client (one request's worth; ``lease`` also counts it in flight)."""
        return self._pooled().client

    def _pooled(self) -> _Pooled[Client]:
        loop = asyncio.get_running_loop()
        with _registry_lock:
            pools = _clients.setdefault(loop, {})
            mine = pools.get(id(self))
            if mine is None:
                mine = pools[id(self)] = _LoopPools(self._close)
        pooled = min(mine.clients, key=lambda entry: entry.in_flight, default=None)
        if pooled is None or (pooled.in_flight >= self.requests_per_client and len(mine.clients) < self.max_clients):
            pooled = _Pooled(self._build())
            mine.clients.append(pooled)
        return cast(_Pooled[Client], pooled)


@dataclass(eq=False)
class _Pooled(Generic[Client]):
    client: Client
    in_flight: int = 0


class _LoopPools:
    """The clients one ``LoopClients`` made on one loop (only that loop touches them)."""

    def __init__(self, close: Callable[[Any], Awaitable[None]]) -> None:
        self.clients: list[_Pooled[Any]] = []
        self._close = close

    async def close(self) -> None:
        for pooled in self.clients:
            await self._close(pooled.client)


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _LoopPools]] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


async def close_clients() -> None:
    """Close every pooled client of the running loop (call it on the loop before stopping it)."""
    with _registry_lock:
        pools = list(_clients.pop(asyncio.get_running_loop(), {}).values())
    for pooled in pools:
        await pooled.close()

"""Anthropic's Messages API, streamed with the official ``anthropic`` SDK (its own retries switched off)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
from anthropic.types import MessageParam

from repositories.chat import ChatMessage, ChatRequest, Finished, LoopClients, StreamEvent, TextDelta, Usage
from repositories.errors import (
    ProviderError,
    RateLimited,
    Rejected,
    StreamBroken,
    Unavailable,
    error_for_status,
)
from repositories.openrouter import parse_retry_after
from repositories.redaction import redact, register_secret

logger = logging.getLogger(__name__)

#: Anthropic requires ``max_tokens``; this is sent when the request sets none.
DEFAULT_MAX_TOKENS = 4096

#: The HTTP status Anthropic uses for each ``error.type``; it classifies an error that arrives inside a stream.
STATUS_FOR_ERROR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def usage_of(raw: Any) -> Usage:
    """Map an Anthropic ``usage`` object (or dict) to ``Usage``; prompt tokens include cache reads and writes."""

    def count(name: str) -> int:
        value = raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)
        return int(value) if isinstance(value, int | float) else 0

    prompt = count("input_tokens") + count("cache_creation_input_tokens") + count("cache_read_input_tokens")
    return Usage(prompt_tokens=prompt, completion_tokens=count("output_tokens"))


class AnthropicProvider:
    """Streams one completion from ``POST {base_url}/v1/messages`` per call; no retries of its own.

    With ``keep_alive`` (the workers' setting) one SDK client, and so one connection pool, serves every stream
    of an event loop; without it a fresh client is made for every ``stream()`` call and closed at its end.
    ``frequency_penalty`` and ``presence_penalty`` are dropped: Anthropic has no such fields.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        read_timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        name: str = "anthropic",
        keep_alive: bool = False,
    ) -> None:
        """Keep the settings; ``base_url`` None means the SDK default (or ``ANTHROPIC_BASE_URL``)."""
        self._api_key = api_key
        register_secret(api_key)
        self._base_url = base_url
        self._timeout = anthropic.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._default_max_tokens = default_max_tokens
        self._name = name
        self._clients = LoopClients(self._new_client, lambda client: client.close(), keep_alive=keep_alive)

    def _new_client(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=self._api_key, base_url=self._base_url, max_retries=0, timeout=self._timeout
        )

    @property
    def name(self) -> str:
        """The provider name stored in job responses."""
        return self._name

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        """The keyword arguments of ``messages.stream`` for ``request``."""
        system = "\n\n".join(message.content for message in request.messages if message.role == "system")
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or self._default_max_tokens,
            "messages": [_message_param(message) for message in request.messages if message.role != "system"],
        }
        if system:
            params["system"] = system
        if request.stop is not None:
            params["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
        # SDK 2.x no longer declares these sampling fields, but the Messages API still reads them from the body.
        sampling = {"temperature": request.temperature, "top_p": request.top_p}
        extra_body = {field: value for field, value in sampling.items() if value is not None}
        if extra_body:
            params["extra_body"] = extra_body
        return params

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Yield text deltas, then one ``Finished``; map every failure onto ``ProviderError``.

        Raises ``RateLimited``/``Unavailable`` for 429/408/5xx/529 and unreachable or timed-out connections,
        ``StreamBroken`` for a stream that is cut, times out while reading, carries a retryable error event or
        ends without ``message_stop``, and ``Rejected`` for 4xx statuses and request-level error events.
        Cancelling the consuming task (or closing this generator) closes the HTTP connection before it returns.
        """
        finished: Finished | None = None
        try:
            async with (
                self._clients.lease() as client,
                client.messages.stream(**self._params(request)) as stream,
            ):
                async for event in stream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        if event.delta.text:
                            yield TextDelta(event.delta.text)
                    elif event.type == "message_stop":
                        # The stream's own snapshot, not ``event.message``: the SDK builds that event from a
                        # parametrized generic model, and in a fresh multi-threaded worker it was seen to come
                        # out as the raw event without ``message`` (an AttributeError on the first job).
                        message = stream.current_message_snapshot
                        finished = Finished(
                            model=message.model or request.model,
                            finish_reason=message.stop_reason,
                            usage=usage_of(message.usage),
                            cost=None,
                        )
        except anthropic.APIStatusError as exc:
            raise self._status_error(exc) from None
        except anthropic.APITimeoutError:
            raise Unavailable("timed out before the response started", provider=self._name) from None
        except anthropic.APIConnectionError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "connection error"
            raise Unavailable(f"could not connect ({cause})", provider=self._name) from None
        except httpx2.TimeoutException as exc:
            raise StreamBroken(f"stream timed out ({type(exc).__name__})", provider=self._name) from None
        except httpx2.TransportError as exc:
            raise StreamBroken(f"connection failed mid-stream ({type(exc).__name__})", provider=self._name) from None
        except (anthropic.APIError, ValueError) as exc:
            # ValueError: an SSE data line that is not JSON; APIError: a response the SDK could not validate.
            raise StreamBroken(f"unreadable stream ({type(exc).__name__})", provider=self._name) from None
        if finished is None:
            raise StreamBroken("stream ended without message_stop", provider=self._name)
        yield finished

    def _status_error(self, exc: anthropic.APIStatusError) -> ProviderError:
        """Classify an error status by its HTTP status, or an ``event: error`` inside a stream by its type."""
        error_type = exc.type or None
        detail = exc.api_message or (redact(exc.message)[:300] if exc.message else "request failed")
        message = f"{error_type}: {detail}" if error_type else detail
        logger.debug(
            "Anthropic error %s (%s), request id %s",
            exc.status_code,
            error_type,
            exc.request_id,
            extra={"provider": self._name},
        )
        if exc.status_code != 200:
            return error_for_status(
                exc.status_code,
                message,
                provider=self._name,
                retry_after_s=parse_retry_after(exc.response.headers.get("retry-after")),
            )
        return self._stream_error(error_type, message)

    def _stream_error(self, error_type: str | None, message: str) -> ProviderError:
        """An ``event: error`` after the stream started (HTTP 200): retried unless it refuses the request itself."""
        status = STATUS_FOR_ERROR_TYPE.get(error_type or "")
        text = f"error mid-stream: {message}"
        if status is None:
            return StreamBroken(text, provider=self._name)
        if status == 429:
            return RateLimited(text, provider=self._name, status_code=status)
        if status == 529:
            return Unavailable(text, provider=self._name, status_code=status)
        classified = error_for_status(status, text, provider=self._name)
        if isinstance(classified, Rejected):
            return classified
        return StreamBroken(text, provider=self._name, status_code=status)


def _message_param(message: ChatMessage) -> MessageParam:
    """A user or assistant message in the Messages API shape."""
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}

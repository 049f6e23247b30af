"""OpenRouter, or any OpenAI-compatible chat-completions endpoint, streamed over SSE with httpx."""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from repositories.chat import ChatRequest, Finished, LoopClients, StreamEvent, TextDelta, Usage
from repositories.errors import (
    PERMANENT_STREAM_ERROR_CODES,
    ProviderError,
    Rejected,
    StreamBroken,
    Unavailable,
    error_for_status,
)
from repositories.http_transport import asyncio_transport
from repositories.redaction import redact, register_secret

logger = logging.getLogger(__name__)

#: Idle connections a worker keeps open to the provider for the next streams.
KEEPALIVE_CONNECTIONS = 256


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (delta-seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _error_message(body: bytes, fallback: str) -> str:
    """Pull ``error.message`` out of an OpenAI-style error body, else a trimmed raw body."""
    try:
        payload = json.loads(body)
    except ValueError:
        # Masked before it is cut: a key cut in half would no longer be recognised.
        text = redact(body.decode("utf-8", "replace").strip())
        return text[:300] or fallback
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return fallback


class OpenRouterProvider:
    """Streams chat completions from ``{base_url}/chat/completions``; no retries of its own."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        read_timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        name: str = "openrouter",
        app_title: str = "llm-job-queue",
        keep_alive: bool = False,
    ) -> None:
        """``keep_alive`` keeps one connection pool per event loop for every stream (the workers' setting);
        without it each stream opens and closes its own client, which suits code that runs a loop per call."""
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        register_secret(api_key)
        # Loading the CA bundle costs tens of milliseconds of CPU: once per provider, not once per job.
        self._ssl_context = ssl.create_default_context()
        self._timeout = httpx.Timeout(connect_timeout_s, read=read_timeout_s)
        self._name = name
        self._app_title = app_title
        self._clients = LoopClients(self._new_client, lambda client: client.aclose(), keep_alive=keep_alive)

    def _new_client(self) -> httpx.AsyncClient:
        # No cap on connections: the worker's thread count already bounds how many streams run at once.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE_CONNECTIONS)
        transport = asyncio_transport(verify=self._ssl_context, limits=limits)
        return httpx.AsyncClient(timeout=self._timeout, transport=transport, follow_redirects=False)

    @property
    def name(self) -> str:
        """The provider name stored in job responses."""
        return self._name

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "X-Title": self._app_title}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        return {
            "model": request.model,
            "messages": [message.model_dump() for message in request.messages],
            "stream": True,
            # llama.cpp and vLLM only report usage while streaming when asked; OpenRouter always does.
            "stream_options": {"include_usage": True},
            **request.sampling_options(),
        }

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Yield text deltas, then one ``Finished``; map every failure onto ``ProviderError``."""
        try:
            async with (
                self._clients.lease() as client,
                client.stream(
                    "POST", f"{self._base_url}/chat/completions", json=self._body(request), headers=self._headers()
                ) as response,
            ):
                if response.status_code != 200:
                    body = await response.aread()
                    raise error_for_status(
                        response.status_code,
                        _error_message(body, response.reason_phrase or "request failed"),
                        provider=self._name,
                        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
                    )
                async for event in self._events(response, request.model):
                    yield event
        except ProviderError:
            raise
        except httpx.TimeoutException as exc:
            raise Unavailable(f"timed out ({type(exc).__name__})", provider=self._name) from None
        except (httpx.TransportError, SSEError) as exc:
            raise StreamBroken(f"connection failed ({type(exc).__name__})", provider=self._name) from None

    async def _events(self, response: httpx.Response, requested_model: str) -> AsyncIterator[StreamEvent]:
        model = requested_model
        finish_reason: str | None = None
        usage: Usage | None = None
        cost: float | None = None
        received_text = False
        done: Finished | None = None
        async for sse in EventSource(response).aiter_sse():
            if done is not None:
                continue  # after [DONE], the body is read to its end: only then can the connection be reused
            if sse.data == "[DONE]":
                if finish_reason is None and not received_text:
                    # llama.cpp's server, for one, ends an interrupted request this way.
                    raise StreamBroken("stream ended with no text and no finish reason", provider=self._name)
                done = Finished(model=model, finish_reason=finish_reason, usage=usage, cost=cost)
                continue
            if not sse.data:
                continue
            try:
                chunk = json.loads(sse.data)
            except ValueError:
                raise StreamBroken("stream sent a chunk that is not JSON", provider=self._name) from None
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                raise self._stream_error(chunk["error"])
            model = str(chunk.get("model") or model)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    received_text = True
                    yield TextDelta(str(delta["content"]))
                if choice.get("finish_reason"):
                    finish_reason = str(choice["finish_reason"])
            if isinstance(chunk.get("usage"), dict):
                raw = chunk["usage"]
                usage = Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))
                if raw.get("cost") is not None:
                    cost = float(raw["cost"])
        if done is None:
            raise StreamBroken("stream ended without [DONE]", provider=self._name)
        yield done

    def _stream_error(self, error: Any) -> ProviderError:
        """An error chunk after the stream started: retried unless its code is a non-retryable status."""
        message = str(error.get("message") or "error in stream") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, int) and code in PERMANENT_STREAM_ERROR_CODES:
            return Rejected(message, provider=self._name, status_code=code)
        status = code if isinstance(code, int) else None
        detail = f"{message} (code {code})" if code is not None and status is None else message
        return StreamBroken(f"error mid-stream: {detail}", provider=self._name, status_code=status)

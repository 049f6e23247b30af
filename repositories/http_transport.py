"""httpx on plain asyncio streams: the providers' transport on the worker's one event loop.

httpx reaches the network through httpcore, and httpcore through AnyIO, which runs each read and
write in a cancel scope of its own (a task lookup, a timer, a context to enter and leave). A worker
streams up to a thousand answers at once on one loop, a chunk at a time: measured on 1,000
concurrent streams, a chunk cost 355 us of CPU through AnyIO and 250 us on asyncio's streams.
httpcore takes a network backend as a documented extension point; ``AsyncioBackend`` is one on
``asyncio.open_connection``, with asyncio's own timeouts and TLS upgrade (``StreamWriter.start_tls``).

``asyncio_transport`` builds httpx's own ``AsyncHTTPTransport`` (its request and response mapping,
its exception mapping) and gives it a connection pool on that backend.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

#: Bytes a connection buffers before it stops reading from its socket (asyncio's default is 64 KiB).
READ_LIMIT = 1 << 20


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection, as httpcore sees it, on an asyncio ``StreamReader``/``StreamWriter`` pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` as soon as any arrive; ``b""`` once the peer closed."""
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("no data from the server in time") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send ``buffer`` (waiting only while the socket's buffer is full)."""
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("the server took no data in time") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Close the connection (the socket closes once what was written is sent)."""
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Upgrade this connection to TLS in place (an ``https`` origin, or a tunnel through a proxy)."""
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._writer.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        """What httpcore asks of a connection: its TLS object, addresses, socket, and whether it is readable."""
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            # An idle pooled connection the server closed (or sent something on) must not be reused. The socket
            # itself is asked, as httpcore's AnyIO backend does: the loop may not have read the close yet.
            return self._reader.at_eof() or _socket_readable(self._writer.get_extra_info("socket"))
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network on asyncio: TCP and Unix connections, and sleeps."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple[Any, ...]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Open a TCP connection (TCP_NODELAY is asyncio's default)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, limit=READ_LIMIT, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"could not connect to {host}:{port} in time") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[tuple[Any, ...]] | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Open a Unix socket connection."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=READ_LIMIT)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"could not connect to {path} in time") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the loop."""
        await asyncio.sleep(seconds)


def _socket_readable(sock: socket.socket | None) -> bool:
    """True when a read on ``sock`` would not block (data, or the peer's close); a socket gone counts as readable."""
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def asyncio_transport(*, verify: ssl.SSLContext, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's HTTP/1.1 transport with its connection pool on ``AsyncioBackend``.

    httpx builds its pool in its constructor with no say over the network backend, so the pool it built is
    replaced (``_pool``) by one with the same settings on this backend: the one private name used here,
    checked by ``tests/unit/test_http_transport.py``.
    """
    transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=verify,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return transport

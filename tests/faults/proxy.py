"""A TCP proxy for fault tests: put it in front of PostgreSQL (or Redis) and switch what it does at any time.

Modes:
  ``pass``    forward bytes both ways (the service works as usual);
  ``refuse``  the listening port is closed (new connections get ECONNREFUSED) and live ones are reset;
  ``silent``  connections are accepted but nothing is ever answered: bytes from both sides are read and
              dropped, as with a partitioned or frozen server. Live connections go silent too.

Switching back to ``pass`` serves new connections normally; connections that went silent stay silent
(their protocol state is lost, as after a real partition), so clients must reconnect.

Usage::

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = proxy.rewrite_url(database_url)
        proxy.set_mode("silent")
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Literal

from sqlalchemy.engine import make_url

Mode = Literal["pass", "refuse", "silent"]
MODES: tuple[Mode, ...] = ("pass", "refuse", "silent")


class _Pipe:
    """One client connection and its upstream connection, with one pump thread per direction."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.silenced = proxy.mode == "silent"
        self.closed = threading.Event()

    def start(self) -> None:
        if not self.silenced:
            try:
                self.upstream = socket.create_connection(self.proxy.target, timeout=5)
                self.upstream.settimeout(None)
            except OSError:
                self.close(reset=True)
                return
        threading.Thread(target=self._pump, args=(self.client, True), daemon=True).start()
        if self.upstream is not None:
            threading.Thread(target=self._pump, args=(self.upstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, from_client: bool) -> None:
        while not self.closed.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.silenced:
                continue
            target = self.upstream if from_client else self.client
            try:
                if target is not None:
                    target.sendall(data)
            except OSError:
                break
        if not self.silenced:
            self.close()

    def silence(self) -> None:
        self.silenced = True

    def close(self, *, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                if reset:
                    # SO_LINGER 0: close with RST, as a refused or crashed server would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)


class TcpProxy:
    """A threaded TCP proxy to ``target_host:target_port`` on a free loopback port, in one of ``MODES``."""

    def __init__(self, target_host: str, target_port: int, *, mode: Mode = "pass", listen_host: str = "127.0.0.1"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.mode: Mode = mode
        self._listener: socket.socket | None = None
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Bind a free port (kept across mode changes) and start accepting, unless the mode is ``refuse``."""
        probe = socket.socket()
        probe.bind((self.listen_host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        if self.mode != "refuse":
            self._listen()
        return self

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopped.set()
        self._close_listener()
        for pipe in self._live_pipes():
            pipe.close(reset=True)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- control --------------------------------------------------------------------------------

    def set_mode(self, mode: Mode) -> None:
        """Switch to ``mode`` now; see the module docstring for what happens to live connections."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            previous, self.mode = self.mode, mode
        if mode == "refuse":
            self._close_listener()
            for pipe in self._live_pipes():
                pipe.close(reset=True)
        elif mode == "silent":
            for pipe in self._live_pipes():
                pipe.silence()
            if previous == "refuse":
                self._listen()
        elif previous == "refuse":
            self._listen()

    def connection_count(self) -> int:
        """Client connections open through the proxy now."""
        return len(self._live_pipes())

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect."""
        return self.listen_host, self.port

    def rewrite_url(self, url: str) -> str:
        """``url`` (a SQLAlchemy or ``redis://`` URL) with its host and port pointing at this proxy."""
        if url.startswith(("redis://", "rediss://")):
            scheme, _, rest = url.partition("://")
            userinfo, _, hostpart = rest.rpartition("@")
            _, _, path = hostpart.partition("/")
            prefix = f"{userinfo}@" if userinfo else ""
            return f"{scheme}://{prefix}{self.listen_host}:{self.port}/{path}"
        return make_url(url).set(host=self.listen_host, port=self.port).render_as_string(hide_password=False)

    # -- internals ------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self.port))
        listener.listen(128)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy-accept", daemon=True).start()

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                with self._lock:
                    closed = self._listener is not listener
                if closed or self._stopped.is_set():
                    return
                time.sleep(0.01)  # a client that gave up in the backlog (ECONNABORTED), say: the proxy goes on
                continue
            pipe = _Pipe(self, client)
            with self._lock:
                self._pipes.add(pipe)
            # Connecting upstream in the pipe's own thread: one slow upstream connect never stalls the accepts.
            threading.Thread(target=pipe.start, name="tcp-proxy-pipe", daemon=True).start()

    def _live_pipes(self) -> list[_Pipe]:
        with self._lock:
            return list(self._pipes)

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

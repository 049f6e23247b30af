"""Make sure the real services the tests use are up, starting them when they are not (never skip)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, *, timeout_s: float = 30.0) -> None:
    """Block until ``host:port`` accepts connections, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")
        time.sleep(0.2)


def ensure_redis(host: str = "127.0.0.1", port: int = 6379) -> None:
    """Start a local Redis without persistence when none answers."""
    if port_open(host, port):
        return
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("Redis is down and redis-server is not installed")
    subprocess.run(
        [server, "--daemonize", "yes", "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"],
        check=True,
    )
    wait_for_port(host, port)


def ensure_postgres(host: str = "127.0.0.1", port: int = 5432) -> None:
    """Start the machine's PostgreSQL cluster when it does not answer."""
    if port_open(host, port):
        return
    versions = sorted(path.name for path in Path("/etc/postgresql").iterdir())
    if not versions:
        raise RuntimeError("PostgreSQL is down and no cluster is configured in /etc/postgresql")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=True,
    )
    wait_for_port(host, port)


CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> str:
    """Debian's Chromium for the browser tests (never a downloaded build), installed with apt when missing.

    ``.ci/run`` installs it too; this lets ``make test`` pass on a fresh machine that has apt but no browser.
    """
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} is missing and apt-get is not available to install Debian's chromium")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    install = ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]
    subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"apt-get installed chromium, but {CHROMIUM} is still missing")
    return CHROMIUM

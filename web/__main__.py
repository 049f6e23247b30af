"""``python -m web --host 127.0.0.1 --port 8000``: serve the web app with uvicorn (development identity).

Prints ``web: serving at http://HOST:PORT/`` once it listens (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Sequence

import uvicorn

READY_LINE = "web: serving at {url}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, bind, serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m web", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model of the operator page's prompt form")
    args = parser.parse_args(argv)

    from settings import ConfigurationError, load_settings

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"web: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from web.app import create_app

    try:
        app = create_app(default_model=args.model)
    except ConfigurationError as exc:
        print(f"web: {exc}", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))

    async def serve() -> None:
        async def announce() -> None:
            while not server.started:
                await asyncio.sleep(0.02)
            print(READY_LINE.format(url=f"http://{shown}:{port}/"), flush=True)

        announcer = asyncio.create_task(announce())
        await server.serve(sockets=[sock])
        announcer.cancel()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

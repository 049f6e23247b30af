"""A model server that reports healthy and then fails every completion: ``python -m tests.loopback.broken_model PORT``.

It stands in for a local server that loads and then crashes or errs on its first request (llama.cpp's AMX
path did), to show that ``make run`` refuses to start on it instead of failing jobs one by one.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BrokenModelHandler(BaseHTTPRequestHandler):
    """``GET /health`` answers 200; every ``POST`` answers 500 with an OpenAI-style error body."""

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/health" else 404, {"status": "ok"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._answer(500, {"error": {"message": "ggml_backend_amx_mul_mat failed", "type": "server_error"}})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Print each request, as a model server's request log would."""
        print(f"broken model server: {self.command} {self.path}", flush=True)


def main() -> None:
    """Serve on the loopback port given as the only argument until killed."""
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), BrokenModelHandler).serve_forever()


if __name__ == "__main__":
    main()

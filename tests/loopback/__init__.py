"""Loopback servers for tests; currently an imitation of OpenRouter's chat-completions endpoint.

The names are imported lazily (PEP 562) so that ``python -m tests.loopback.openrouter`` does not import
the module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.loopback.openrouter import OpenRouterServer, RecordedRequest, Reply

__all__ = ["OpenRouterServer", "RecordedRequest", "Reply"]


def __getattr__(name: str) -> Any:
    """Resolve the re-exported names from `tests.loopback.openrouter` on first access."""
    if name in __all__:
        return getattr(importlib.import_module("tests.loopback.openrouter"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

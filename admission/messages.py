"""Helpers both admission gates share: who holds a delivery's slot, handoff sends, the lanes' entry format."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()


@contextmanager
def handing_off() -> Iterator[None]:
    """Within this block, this thread's enqueues are never parked at send: the messages hold slots already."""
    previous = is_handing_off()
    _local.handing_off = True
    try:
        yield
    finally:
        _local.handing_off = previous


def is_handing_off() -> bool:
    """Whether this thread is inside ``handing_off()``."""
    return bool(getattr(_local, "handing_off", False))


def holder_of(message: Any) -> str:
    """Who holds a delivery's slot: its attempt token (the one that fences the job row), else its message id."""
    # Imported here: ``middleware``'s package imports the re-export shims of ``admission`` (a cycle at import).
    from middleware.attempts import attempt_token_of

    return attempt_token_of(message) or str(message.message_id)


def parked_entry(message: Any) -> bytes:
    """A lane's parked entry: the message id, a newline, the encoded message (see ``split_entry``)."""
    return bytes(message.message_id.encode() + b"\n" + message.encode())


def split_entry(entry: bytes) -> tuple[str, bytes]:
    """A lane's parked entry back into ``message_id`` and encoded message."""
    holder, _, body = entry.partition(b"\n")
    return holder.decode(), body

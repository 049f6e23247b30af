"""The one place that keeps secrets out of provider errors, log lines, stored errors and stored tracebacks.

Two kinds of secret are masked by ``redact``:

- every value registered with ``register_secret`` (the configured API keys and the passwords of the
  database and Redis URLs; each provider registers its own key too), wherever it appears;
- anything shaped like a credential, configured or not: ``sk-...`` keys (OpenAI, ``sk-ant-...``,
  ``sk-or-...``), ``Bearer`` tokens, ``api_key=...`` / ``"x-api-key": "..."`` pairs, and the password
  of a ``scheme://user:password@host`` URL.

Redact before truncating: a key cut in half is no longer recognised.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit

#: What a masked secret is replaced with.
REDACTED = "[redacted]"

#: Registered values shorter than this are ignored: masking "abc" everywhere would mangle ordinary text.
MIN_SECRET_LENGTH = 6

_KEY_SHAPED = re.compile(r"\bsk-[A-Za-z0-9][A-Za-z0-9_\-]{6,}")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}")
_KEY_PAIR = re.compile(
    r"(?i)(\b(?:x-)?(?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"'&,;}]{4,}"
)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@/\s]+(@)", re.IGNORECASE)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Mask ``value`` in everything ``redact`` sees from now on (idempotent; short or empty values are ignored)."""
    global _secrets
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if value not in _secrets:
            # Longest first, so a secret containing another is masked whole.
            _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


def register_secrets(values: Iterable[str | None]) -> None:
    """``register_secret`` for each value."""
    for value in values:
        register_secret(value)


def url_password(url: str | None) -> str | None:
    """The password in a ``scheme://user:password@host`` URL, if it has one (None when unparsable)."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact(text: str) -> str:
    """``text`` with every registered secret and every credential-shaped string replaced by ``[redacted]``."""
    if not text:
        return text
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _KEY_SHAPED.sub(REDACTED, text)
    text = _BEARER.sub(lambda match: match.group(1) + REDACTED, text)
    text = _KEY_PAIR.sub(lambda match: match.group(1) + REDACTED, text)
    return _URL_PASSWORD.sub(lambda match: match.group(1) + "***" + match.group(2), text)


def redacted_url(url: str) -> str:
    """``url`` with the password of its user info and of a ``password=`` query parameter replaced by ``***``."""
    url = _URL_PASSWORD.sub(lambda match: match.group(1) + "***" + match.group(2), url)
    return re.sub(r"(?<=[?&]password=)[^&#]*", "***", url)


def registered_count() -> int:
    """How many secret values are registered (for start-up checks and tests)."""
    return len(_secrets)

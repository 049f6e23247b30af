"""Short-lived per-job stream tokens: an HMAC over the job, its user and an expiry time.

A browser's ``EventSource`` cannot send the host app's headers; a token handed out with the job
lets it open that one job's event stream without the app's session cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Issues and checks tokens valid for ``ttl_s`` seconds for one job of one user."""

    def __init__(self, secret: bytes | None = None, *, ttl_s: int = 600) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("WEB_STREAM_SECRET must be at least 16 bytes")
        self._secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def issue(self, job_id: str, user_id: str, *, now: float | None = None) -> str:
        """A token for ``user_id``'s job ``job_id``, valid ``ttl_s`` seconds from ``now``."""
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        body = f"{expires}.{_b64(user_id.encode())}"
        return f"{body}.{self._sign(job_id, body)}"

    def user_of(self, token: str, job_id: str, *, now: float | None = None) -> str | None:
        """The user the token was issued to for ``job_id``, or None when it is invalid, another job's or expired."""
        try:
            expires_text, user_part, signature = token.split(".")
            expires = int(expires_text)
            user_id = _unb64(user_part).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(signature, self._sign(job_id, f"{expires_text}.{user_part}")):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        return user_id

    def _sign(self, job_id: str, body: str) -> str:
        digest = hmac.new(self._secret, f"{job_id}\n{body}".encode(), hashlib.sha256).digest()
        return _b64(digest)

"""Provider lanes: a provider account (its key's identity), optionally narrowed to one model, with shared limits.

A lane is ``(account, key identity, model or *)``. The key identity is a short SHA-256 prefix of the API
key, never the key itself. Limits are optional: requests and tokens per sliding window (a minute unless
``window_s`` says otherwise) and requests in flight. Configured by one JSON setting, ``PROVIDER_LANES``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

#: Providers sharing one account: ``claude-agent-sdk`` uses the Anthropic API key, so both share its lanes.
ACCOUNT_OF = {"openrouter": "openrouter", "anthropic": "anthropic", "claude-agent-sdk": "anthropic"}

ANY = "*"

#: Tokens the estimate adds per message for its role and framing (OpenAI documents 3 to 4).
MESSAGE_OVERHEAD_TOKENS = 8
#: Characters per token of the estimate: right within about 25% for English prose with GPT and Claude
#: tokenizers, low by up to 3x for code, CJK text or base64 (those use more tokens per character).
CHARS_PER_TOKEN = 4


class LaneConfig(BaseModel):
    """One lane of ``PROVIDER_LANES``; every limit is optional (absent: not limited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["openrouter", "anthropic", "claude-agent-sdk"]
    key_id: Annotated[str, Field(min_length=1, max_length=64)] = ANY
    """The key identity this lane is for (``llm-jobs stats`` shows it), or ``*``: whichever key the worker has."""
    model: Annotated[str, Field(min_length=1, max_length=200)] = ANY
    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0)] | None = None
    concurrent: Annotated[int, Field(gt=0)] | None = None
    window_s: Annotated[float, Field(ge=1, le=3600)] = 60
    """The sliding window both per-minute limits are counted over, in seconds (60: they are per minute)."""
    margin_ms: Annotated[int, Field(ge=0, le=60_000)] = 250
    """A request stays counted this much longer than the window: the provider's clock sees it a moment later."""
    default_max_tokens: Annotated[int, Field(gt=0)] = 1024
    """Tokens reserved for the answer of a request that sets no ``max_tokens``."""
    pause_s: Annotated[float, Field(gt=0, le=3600)] = 5
    """Pause after a 429 or 529 without ``Retry-After``, doubled after each 429 of a probe, in seconds."""
    max_pause_s: Annotated[float, Field(gt=0, le=3600)] = 60
    """The longest pause without ``Retry-After``, in seconds."""

    @field_validator("model", "key_id")
    @classmethod
    def _no_separator(cls, value: str) -> str:
        if "|" in value or "\n" in value:
            raise ValueError("must not contain '|' or a newline")
        return value


_LANES = TypeAdapter(list[LaneConfig])


def parse_lanes(text: str) -> tuple[LaneConfig, ...]:
    """The lanes of a ``PROVIDER_LANES`` value (empty: no lanes); ``ValueError`` naming the bad field."""
    if not text.strip():
        return ()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"must be a JSON list of lanes: {exc.msg} at character {exc.pos}") from None
    try:
        lanes = _LANES.validate_python(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "lanes"
            problems.append(f"lane {where}: {error['msg']}")
        raise ValueError("; ".join(problems)) from None
    seen: set[tuple[str, str, str]] = set()
    for lane in lanes:
        ident = (ACCOUNT_OF[lane.provider], lane.key_id, lane.model)
        if ident in seen:
            raise ValueError(f"two lanes for provider {lane.provider}, key {lane.key_id}, model {lane.model}")
        seen.add(ident)
    return tuple(lanes)


def key_identity(key: str | None) -> str:
    """A short, stable name of an API key that reveals nothing of it: 12 hex digits of its SHA-256."""
    if not key:
        return "nokey"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Lane:
    """A configured lane resolved for this worker's key; ``lane_id`` names it in Redis and in the stats."""

    lane_id: str
    provider: str
    key_id: str
    model: str
    config: LaneConfig

    @property
    def window_ms(self) -> int:
        """How long a request counts against the per-minute limits, margin included, in milliseconds."""
        return int(self.config.window_s * 1000) + self.config.margin_ms

    def label(self) -> str:
        """How operators read the lane: ``openrouter key 3f2a9c1e0b4d model *``."""
        return f"{self.provider} key {self.key_id} model {self.model}"


@dataclass(frozen=True, slots=True)
class LaneTicket:
    """What admission needs of one message: its lane, its user and job, and the tokens to reserve."""

    lane: Lane
    user_id: str
    job_id: str
    reserve_tokens: int
    prompt_tokens: int


class LaneBook:
    """The lanes of this worker: a request goes to the lane of its model, else to its account's ``*`` lane."""

    def __init__(self, lanes: Iterable[LaneConfig], *, keys: dict[str, str | None]) -> None:
        """``keys`` maps a provider name (``openrouter``, ``anthropic``) to the API key this worker uses."""
        self._by_ident: dict[tuple[str, str], Lane] = {}
        for config in lanes:
            account = ACCOUNT_OF[config.provider]
            key_id = key_identity(keys.get(account))
            if config.key_id not in (ANY, key_id):
                continue  # a lane of another key (another worker group's account)
            lane_id = f"{account}|{key_id}|{config.model}"
            self._by_ident[(account, config.model)] = Lane(lane_id, account, key_id, config.model, config)

    def __bool__(self) -> bool:
        return bool(self._by_ident)

    @property
    def lanes(self) -> list[Lane]:
        """Every lane of this worker."""
        return list(self._by_ident.values())

    def lane_for(self, provider: str, model: str) -> Lane | None:
        """The lane a request to ``model`` through ``provider`` waits in, or None (not limited)."""
        account = ACCOUNT_OF.get(provider, provider)
        return self._by_ident.get((account, model)) or self._by_ident.get((account, ANY))


def estimate_prompt_tokens(contents: Sequence[str]) -> int:
    """A cheap token estimate of a prompt: characters / 4 plus a per-message overhead (see ``CHARS_PER_TOKEN``)."""
    chars = sum(len(content) for content in contents)
    return math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * len(contents)


def estimate_text_tokens(text_chars: int) -> int:
    """Tokens of generated text of ``text_chars`` characters, by the same estimate."""
    return math.ceil(text_chars / CHARS_PER_TOKEN)

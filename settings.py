"""Process settings, read once by the entry points (``actors``, ``scheduler.py``, the run script).

Every variable of the public contract lives here. Everything below the entry points takes plain
constructor arguments instead of reading the environment.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from admission.lanes import parse_lanes


class ProviderName(StrEnum):
    """The model providers a worker can be configured with (``LLM_PROVIDER``)."""

    OPENROUTER = "openrouter"
    ANTHROPIC = "anthropic"
    CLAUDE_AGENT_SDK = "claude-agent-sdk"


class UserLimitKind(StrEnum):
    """The limiter applied per user and actor (``USER_LIMIT_KIND``)."""

    CONCURRENT = "concurrent"
    WINDOW = "window"
    BUCKET = "bucket"


class LogFormatName(StrEnum):
    """How workers write their logs (``LOG_FORMAT``)."""

    TEXT = "text"
    JSON = "json"


class ConfigurationError(ValueError):
    """A setting is missing or invalid; the message names the variable and never its value."""


PositiveInt = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    """All settings of the service, from the environment or a ``.env`` file (names are case-insensitive)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: SecretStr | None = None
    """The message broker when it is not Redis: ``amqp://user:password@host:5672/vhost`` makes it RabbitMQ
    (durable queues, publisher confirms); unset, the broker is the Redis at ``REDIS_URL``. Throttle, lanes,
    cancel signals and live text stay on ``REDIS_URL`` either way."""
    database_url: str = "sqlite:///./llm_jobs.db"
    llm_provider: ProviderName = ProviderName.OPENROUTER

    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None

    preview_model: str = "openai/gpt-4o-mini"

    generate_user_concurrency: PositiveInt = 5
    preview_user_concurrency: PositiveInt = 10
    user_limit_kind: UserLimitKind = UserLimitKind.CONCURRENT
    """How ``*_USER_CONCURRENCY`` is applied: jobs running at once, or starts per ``USER_LIMIT_PERIOD_S``."""
    user_limit_period_s: PositiveInt = 60
    """The window (``window``) or bucket (``bucket``) length of a start-rate limit, in seconds."""
    throttle_lease_s: Annotated[int, Field(ge=2)] = 30
    """A throttle slot outlives its last renewal this long: a killed worker's slots return within it, in seconds."""

    job_retention_days: PositiveInt = 7
    cleanup_cron: str = "0 2 * * *"

    retry_min_backoff_ms: PositiveInt = 2000
    retry_max_backoff_ms: PositiveInt = 60000

    # Operational knobs beyond the contract, documented in the README.
    generate_timeout_s: PositiveInt = 900
    """Wall-clock limit of one generate attempt, in seconds."""
    preview_timeout_s: PositiveInt = 60
    """Wall-clock limit of one preview attempt, in seconds."""
    provider_read_timeout_s: PositiveInt = 120
    """Longest silence tolerated on a provider stream before the attempt counts as timed out, in seconds."""
    claude_cli_max_retries: Annotated[int, Field(ge=0, le=10)] = 0
    """Retries the Claude Code CLI makes by itself inside one ``claude-agent-sdk`` attempt (connection errors, 429,
    5xx); 0 leaves every retry to the queue's policy. ``make run`` sets 2 against its local model server."""
    progress_interval_ms: Annotated[int, Field(ge=50, le=1000)] = 500
    """How often the partial text and the job heartbeat are written while streaming, in milliseconds."""
    job_lease_s: Annotated[int, Field(ge=5)] = 15
    """A processing job whose heartbeat is older than this may be taken over by another message, in seconds."""
    broker_heartbeat_timeout_ms: Annotated[int, Field(ge=5000)] = 15000
    """A worker silent this long is presumed dead and its unacked messages are requeued, in milliseconds."""
    reconcile_interval_s: PositiveInt = 30
    """How often the scheduler's reconciler looks for jobs with no live path to completion, in seconds."""
    reconcile_pending_after_s: PositiveInt = 60
    """A pending job untouched this long with no message in the broker is re-sent by the reconciler, in seconds."""
    store_outage_wait_s: PositiveInt = 300
    """How long a worker keeps an attempt's outcome while the store is unreachable before the reconciler's
    re-run takes over, in seconds; the attempt waits, it never spends a provider retry on it."""
    shutdown_grace_s: Annotated[int, Field(ge=0)] = 20
    """On SIGTERM, running jobs may go on this long before they are handed back to the queue, in seconds."""
    worker_poll_interval_ms: Annotated[int, Field(ge=10, le=1000)] = 1000
    """The longest an idle queue consumer sleeps between Redis fetches when no enqueue wakes it, in milliseconds
    (every enqueue, by any process, wakes the consumers of its queue over pub/sub; this is the fallback)."""
    database_connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 3.0
    """Longest wait to open a PostgreSQL connection or take one from the pool, in seconds."""
    database_statement_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """Longest a PostgreSQL statement may run (the client gives up 1 s later); SQLite's busy timeout, in seconds."""
    redis_socket_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    """Longest wait to connect to Redis, for an answer, or for a free pooled connection, in seconds."""
    redis_max_connections: Annotated[int, Field(ge=2, le=10_000)] = 64
    """Connections per Redis pool and process; a thread finding them all busy waits ``REDIS_SOCKET_TIMEOUT_S``."""
    max_request_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024 * 1024
    """Largest request a job may carry: ``params`` (or a preview's title and content) as UTF-8 JSON, in bytes."""
    cancel_signals: bool = True
    """Signal cancels to the owning worker over Redis pub/sub; off, workers notice at their next heartbeat."""
    auto_migrate: bool = True
    """Apply the Alembic migrations on first use of the job store."""
    metrics_enabled: bool = False
    """Serve Prometheus metrics from every worker (Dramatiq's exposition server, ``dramatiq_prom_port``)."""
    live_text_enabled: bool = True
    """Workers append each job's new text to a Redis Stream (coalesced to ~50 ms) for the web side's event streams."""
    live_text_ttl_s: PositiveInt = 600
    """A job's live text stream stays in Redis this long after its attempt ended, in seconds (then: the store)."""
    web_stream_secret: SecretStr | None = None
    """HMAC key of the web side's per-job stream tokens; unset, each web process makes a random one."""
    web_stream_token_ttl_s: PositiveInt = 600
    """How long a per-job stream token opens the job's event stream, in seconds."""
    web_dev_identity: bool = False
    """Development only: the web app takes the user from the ``X-User-Id`` header (anyone can be anyone)."""
    provider_lanes: str = ""
    """JSON list of provider lanes with shared request, token and concurrency limits (see ``admission.lanes``);
    empty: no lane, nothing limited per provider account."""
    lane_max_wait_s: PositiveInt = 3600
    """A job waiting for its provider lane longer than this gives up with an error, in seconds."""
    log_level: str = "INFO"
    log_format: LogFormatName = LogFormatName.TEXT
    """``text`` lines with the job's ids, or ``json``: one object per line (workers and the scheduler)."""

    @field_validator("cleanup_cron")
    @classmethod
    def _cron_has_five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("must be a five-field crontab expression, e.g. '0 2 * * *'")
        return value

    @field_validator("provider_lanes")
    @classmethod
    def _lanes_are_valid(cls, value: str) -> str:
        parse_lanes(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _database_is_supported(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// SQLAlchemy URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps:// (unset: the broker is the Redis at REDIS_URL)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _backoff_bounds_are_ordered(self) -> Settings:
        if self.retry_min_backoff_ms > self.retry_max_backoff_ms:
            raise ValueError("RETRY_MIN_BACKOFF_MS must not exceed RETRY_MAX_BACKOFF_MS")
        return self

    def require_provider_key(self) -> None:
        """Raise ``ConfigurationError`` when the configured provider has no API key."""
        if self.llm_provider is ProviderName.OPENROUTER:
            # A local OpenAI-compatible server (llama.cpp, vLLM) needs no key; openrouter.ai does.
            if self.openrouter_api_key is None and "openrouter.ai" in self.openrouter_base_url:
                raise ConfigurationError("OPENROUTER_API_KEY is required when LLM_PROVIDER=openrouter")
        elif self.anthropic_api_key is None:
            raise ConfigurationError(f"ANTHROPIC_API_KEY is required when LLM_PROVIDER={self.llm_provider}")


def load_settings() -> Settings:
    """Read the settings, turning a validation failure into a ``ConfigurationError`` naming each variable.

    Pydantic's own message echoes the rejected input, which could be a secret; this one does not.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            variable = ".".join(str(part) for part in error["loc"]).upper() or "settings"
            problems.append(f"{variable}: {error['msg']}")
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None

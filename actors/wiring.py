"""Builds the parts of a ``JobQueue`` (``actors.queue``) from ``Settings``: the only place that reads them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.rate_limits.backends import RedisBackend as RateLimitRedisBackend
from pydantic import SecretStr
from sqlalchemy import Engine

from actors.cancellation import CancelSignals
from actors.jobs import PREVIEW_INPUT_CHARS, PREVIEW_MAX_CHARS, PREVIEW_PROMPT, JobRunner
from actors.retry_policy import RetryPolicy
from admission.keys import job_key
from admission.lane_gate import LaneGate
from admission.lane_store import RedisLaneStore
from admission.lanes import LaneBook, LaneTicket, estimate_prompt_tokens, parse_lanes
from admission.leases import RedisLeaseStore
from admission.limits import BucketLimit, ConcurrencyLimit, StartRateGate, UserLimit, WindowLimit
from admission.metrics import LaneGauges
from admission.user_admission import UserAdmission
from brokers.rabbitmq import RabbitmqJobBroker, rabbitmq_broker
from brokers.waking_redis import WakingRedisBroker
from middleware.attempts import AttemptTokens
from middleware.bad_messages import MalformedMessages, RedactTracebacks
from middleware.busy_threads import BusyThreads, BusyThreadsGate
from middleware.graceful_shutdown import GracefulShutdown
from middleware.log_format import LogFormat
from middleware.metrics import JobMetrics
from middleware.startup import ConfigurationCheck
from middleware.throttle import UserThrottle
from middleware.worker_tuning import WorkerTuning
from repositories.chat import ChatProvider
from repositories.live_text import LiveText, RedisLiveText
from repositories.migrations import upgrade_database
from repositories.openrouter import OpenRouterProvider
from repositories.redaction import register_secrets, url_password
from repositories.store import JobKind, JobStore, create_store_engine
from settings import ConfigurationError, ProviderName, Settings, UserLimitKind

logger = logging.getLogger(__name__)

#: Chance, per million Redis commands, that a command also requeues the messages of dead workers.
#: Dramatiq's default (1 in 1000) can leave a killed worker's messages stranded for a long time on a
#: quiet queue; 1 in 10 keeps recovery within seconds of the heartbeat timeout at negligible cost.
MAINTENANCE_CHANCE = 100_000


def build_broker(
    settings: Settings,
    *,
    admission: UserAdmission,
    retry_policy: RetryPolicy,
    metrics: JobMetrics | None = None,
    lanes: LaneGate | None = None,
    hand_back: Callable[[], object],
    on_malformed: Callable[[Any, str], None],
    busy: BusyThreads,
) -> WakingRedisBroker | RabbitmqJobBroker:
    """A Redis broker with retries capped by the contract and fast recovery of a killed worker's messages, or
    with ``BROKER_URL=amqp://...`` a RabbitMQ broker with the same middleware (``brokers.rabbitmq``).

    ``hand_back`` gives the running jobs back to the queue at shutdown; ``on_malformed`` fails the job of a
    message the actor cannot take."""
    client = redis_client(settings)
    middleware: list[dramatiq.Middleware] = [
        # First: a message's whole handling, middleware included, holds one of the process's few busy slots.
        BusyThreadsGate(busy),
        # Before anything reads message.kwargs: a call the actor cannot take is dead-lettered, never retried.
        MalformedMessages(on_rejected=on_malformed),
        RedactTracebacks(),
        # Before the throttle: each delivery's fresh token holds its slot and fences its job row.
        AttemptTokens(),
        # First after it, so that whatever skips a message later still finds its throttle slot released.
        UserThrottle(admission),
        # After the user throttle: a job takes its user's slot first, then its provider lane's.
        *([lanes] if lanes is not None else []),
        AgeLimit(),
        TimeLimit(time_limit=(settings.generate_timeout_s + 60) * 1000),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        retry_policy.retries_middleware(),
        CurrentMessage(),
        WorkerTuning(prefetch_per_thread=1, poll_interval_ms=settings.worker_poll_interval_ms),
        # LOG_LEVEL when set; unset, Dramatiq's CLI level (INFO, or DEBUG with -v) stays.
        LogFormat(
            log_format=settings.log_format,
            log_level=settings.log_level if "log_level" in settings.model_fields_set else None,
        ),
        ConfigurationCheck(check=settings.require_provider_key),
        GracefulShutdown(
            grace_ms=settings.shutdown_grace_s * 1000,
            hand_back=hand_back,
        ),
    ]
    if metrics is not None:
        from dramatiq.middleware.prometheus import Prometheus  # reads dramatiq_prom_* at import

        # Dramatiq runs after_* hooks in reverse order: Prometheus must switch prometheus_client to
        # multiprocess mode at process boot before JobMetrics creates its metrics.
        middleware += [metrics, Prometheus()]
    if settings.broker_url is not None:
        broker: WakingRedisBroker | RabbitmqJobBroker = rabbitmq_broker(
            settings.broker_url.get_secret_value(), client, middleware
        )
    else:
        broker = WakingRedisBroker(
            client=redis_client(settings),
            middleware=middleware,
            heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
            maintenance_chance=MAINTENANCE_CHANCE,
        )
    # Every undelayed send, ``actor.send()`` included, joins the back of its user's line when there is one.
    broker.admission = admission
    return broker


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client whose every wait is bounded by ``REDIS_SOCKET_TIMEOUT_S``: connecting, each answer, and
    taking a connection from its pool of ``REDIS_MAX_CONNECTIONS`` (a thread finding them all busy waits for
    one instead of failing with "Too many connections")."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_socket_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
    )
    return redis.Redis(connection_pool=pool)


def register_configured_secrets(settings: Settings) -> None:
    """Have ``repositories.redaction`` mask every secret the settings hold: API keys and URL passwords."""
    values = [getattr(settings, name) for name in type(settings).model_fields]
    register_secrets(value.get_secret_value() for value in values if isinstance(value, SecretStr))
    register_secrets(url_password(url) for url in (settings.database_url, settings.redis_url))


#: The job kind of each actor that runs jobs, to fail the job of a malformed message.
ACTOR_KINDS = {"generate_llm_response": JobKind.GENERATE, "generate_preview": JobKind.PREVIEW}


def user_admission(settings: Settings, metrics: JobMetrics | None = None) -> UserAdmission:
    """Per-user admission: concurrency slots and parked lines in Redis, window and bucket limits too, each
    message limited by the user ``admission.keys.job_key`` reads from it."""
    client = redis_client(settings)
    return UserAdmission(
        leases=RedisLeaseStore(client),
        key_of=job_key,
        gate=StartRateGate(RateLimitRedisBackend(client=client)),
        lease_ms=settings.throttle_lease_s * 1000,
        on_waiting=metrics.sample_waiting if metrics is not None else None,
    )


def job_metrics(settings: Settings, *, stuck_probe: Callable[[], dict[str, int]]) -> JobMetrics | None:
    """Job metrics when ``METRICS_ENABLED`` is on; one instance serves as middleware and as the runner's observer.

    ``stuck_probe`` counts the stuck jobs (processing, pending), sampled every ``RECONCILE_INTERVAL_S``."""
    if not settings.metrics_enabled:
        return None
    return JobMetrics(stuck_probe=stuck_probe, stuck_every_s=settings.reconcile_interval_s)


def build_provider(settings: Settings) -> ChatProvider:
    """The provider chosen by ``LLM_PROVIDER``; ``ConfigurationError`` when its key is missing."""
    settings.require_provider_key()
    if settings.llm_provider is ProviderName.OPENROUTER:
        key = settings.openrouter_api_key.get_secret_value() if settings.openrouter_api_key else None
        return OpenRouterProvider(
            base_url=settings.openrouter_base_url,
            api_key=key,
            read_timeout_s=settings.provider_read_timeout_s,
            keep_alive=True,
        )
    if settings.llm_provider is ProviderName.ANTHROPIC:
        return build_anthropic_provider(settings)
    from repositories.claude_agent import ClaudeAgentProvider

    return ClaudeAgentProvider(
        api_key=_anthropic_key(settings),
        base_url=settings.anthropic_base_url,
        wall_clock_limit_s=settings.generate_timeout_s,
        cli_max_retries=settings.claude_cli_max_retries,
    )


def _anthropic_key(settings: Settings) -> str:
    if settings.anthropic_api_key is None:
        raise ConfigurationError(f"ANTHROPIC_API_KEY is required when LLM_PROVIDER={settings.llm_provider}")
    return settings.anthropic_api_key.get_secret_value()


def build_anthropic_provider(settings: Settings) -> ChatProvider:
    """The Anthropic Messages API provider."""
    from repositories.anthropic import AnthropicProvider  # about 1 s to import: only its workers pay

    return AnthropicProvider(
        api_key=_anthropic_key(settings),
        base_url=settings.anthropic_base_url,
        read_timeout_s=settings.provider_read_timeout_s,
        keep_alive=True,
    )


def build_preview_provider(settings: Settings) -> ChatProvider:
    """Previews are one fast direct call: with the agent SDK configured they use the Anthropic API itself."""
    if settings.llm_provider is ProviderName.CLAUDE_AGENT_SDK:
        return build_anthropic_provider(settings)
    return build_provider(settings)


def user_limit(settings: Settings, limit: int) -> UserLimit:
    """The per-user limit of ``USER_LIMIT_KIND`` with ``limit`` jobs (running at once, or starts per period)."""
    if settings.user_limit_kind is UserLimitKind.WINDOW:
        return WindowLimit(limit, settings.user_limit_period_s)
    if settings.user_limit_kind is UserLimitKind.BUCKET:
        return BucketLimit(limit, settings.user_limit_period_s * 1000)
    return ConcurrencyLimit(limit)


def live_text(settings: Settings) -> LiveText | None:
    """The Redis Stream writer of each job's new text, when ``LIVE_TEXT_ENABLED`` is on."""
    if not settings.live_text_enabled:
        return None
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    return RedisLiveText(client, ended_ttl_s=settings.live_text_ttl_s)


def retry_policy(settings: Settings) -> RetryPolicy:
    """The one retry policy: the contract's attempt caps, its classification, and the backoff bounds of the settings."""
    return RetryPolicy(min_backoff_ms=settings.retry_min_backoff_ms, max_backoff_ms=settings.retry_max_backoff_ms)


def build_runtime(
    settings: Settings,
    policy: RetryPolicy,
    metrics: JobMetrics | None = None,
    lanes: LaneGate | None = None,
    *,
    busy: BusyThreads | None = None,
) -> tuple[JobStore, JobRunner, CancelSignals | None]:
    """The job store (migrated when ``AUTO_MIGRATE`` is on), the job runner and the cancel signals."""
    engine = store_engine(settings)
    if settings.auto_migrate:
        try:
            upgrade_database(engine)
        except Exception:
            engine.dispose()  # built again on the next use
            raise
    store = JobStore(engine)
    signals = CancelSignals(redis_client(settings)) if settings.cancel_signals else None
    runner = JobRunner(
        store=store,
        # Built once per process and shared by its threads; a factory that raises is tried again next job.
        provider_factory=functools.cache(lambda: build_provider(settings)),
        preview_provider_factory=functools.cache(lambda: build_preview_provider(settings)),
        preview_model=settings.preview_model,
        retry_policy=policy,
        progress_interval_s=settings.progress_interval_ms / 1000,
        lease_s=settings.job_lease_s,
        generate_timeout_s=settings.generate_timeout_s,
        preview_timeout_s=settings.preview_timeout_s,
        store_outage_wait_s=settings.store_outage_wait_s,
        cancel_signals=signals,
        observer=metrics,
        live_text=live_text(settings),
        lanes=lanes,
        # The progress writer's one transaction per interval carries every running job's heartbeat: on a
        # pool of its own, it never queues behind the other threads' statements (1,000 claims at once).
        progress_store=JobStore(store_engine(settings, pool_size=1)),
        busy=busy,
    )
    return store, runner, signals


def store_engine(settings: Settings, *, pool_size: int = 10) -> Engine:
    """An engine on ``DATABASE_URL`` with the settings' connect and statement timeouts."""
    return create_store_engine(
        settings.database_url,
        pool_size=pool_size,
        connect_timeout_s=settings.database_connect_timeout_s,
        statement_timeout_s=settings.database_statement_timeout_s,
    )


def lane_book(settings: Settings) -> LaneBook:
    """The ``PROVIDER_LANES`` of this worker, resolved for the API keys it is configured with."""
    keys = {
        "openrouter": settings.openrouter_api_key.get_secret_value() if settings.openrouter_api_key else None,
        "anthropic": settings.anthropic_api_key.get_secret_value() if settings.anthropic_api_key else None,
    }
    return LaneBook(parse_lanes(settings.provider_lanes), keys=keys)


def lane_tickets(settings: Settings, book: LaneBook) -> Callable[[Any], LaneTicket | None]:
    """The one function that reads a job message for its lane: provider, model, user and the tokens to reserve."""
    generate_provider = str(settings.llm_provider)
    preview_provider = (
        str(ProviderName.ANTHROPIC) if settings.llm_provider is ProviderName.CLAUDE_AGENT_SDK else generate_provider
    )

    def ticket(message: Any) -> LaneTicket | None:
        fields: dict[str, Any] = dict(zip(("job_id", "user_id"), message.args, strict=False))
        fields.update(message.kwargs)
        job_id, user_id = fields.get("job_id"), fields.get("user_id")
        if not isinstance(job_id, str) or not isinstance(user_id, str):
            return None
        if message.actor_name == "generate_llm_response":
            params = fields.get("params", (list(message.args[2:3]) or [None])[0])
            if not isinstance(params, dict) or not isinstance(params.get("model"), str):
                return None
            lane = book.lane_for(generate_provider, params["model"])
            if lane is None:
                return None
            raw_messages = params.get("messages")
            messages: list[Any] = raw_messages if isinstance(raw_messages, list) else []
            contents = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
            prompt = estimate_prompt_tokens(contents)
            max_tokens = params.get("max_tokens")
            answer = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else lane.config.default_max_tokens
            return LaneTicket(lane, user_id, job_id, prompt + answer, prompt)
        if message.actor_name == "generate_preview":
            content, title = fields.get("content"), fields.get("title")
            if not isinstance(content, str) or len(content) <= PREVIEW_MAX_CHARS:
                return None  # kept as is: no model is called
            lane = book.lane_for(preview_provider, settings.preview_model)
            if lane is None:
                return None
            prompt = estimate_prompt_tokens([PREVIEW_PROMPT, f"Title: {title}\n\n{content[:PREVIEW_INPUT_CHARS]}"])
            return LaneTicket(lane, user_id, job_id, prompt + 100, prompt)
        return None

    return ticket


def lane_gate(
    settings: Settings,
    metrics: JobMetrics | None = None,
    *,
    on_waiting: Callable[[Any, str], None],
    on_gave_up: Callable[[Any, str], None],
) -> LaneGate | None:
    """The provider lanes' middleware (also the runner's hooks), or None when ``PROVIDER_LANES`` is empty.

    ``on_waiting`` notes on a job why it waits; ``on_gave_up`` fails a job that waited past ``LANE_MAX_WAIT_S``."""
    book = lane_book(settings)
    if not book:
        return None

    return LaneGate(
        store=RedisLaneStore(redis_client(settings)),
        lanes=book.lanes,
        tickets=lane_tickets(settings, book),
        lease_ms=settings.throttle_lease_s * 1000,
        max_wait_s=settings.lane_max_wait_s,
        on_waiting=on_waiting,
        on_gave_up=on_gave_up,
        on_sample=LaneGauges().sample if metrics is not None else None,
    )

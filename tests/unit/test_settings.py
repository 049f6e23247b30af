"""Settings: every contract variable with its default; a bad value stops start-up naming the variable."""

from __future__ import annotations

import pytest

from settings import ConfigurationError, ProviderName, Settings, load_settings


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "REDIS_URL",
        "DATABASE_URL",
        "LLM_PROVIDER",
        "OPENROUTER_API_KEY",
        "OPENROUTER_BASE_URL",
        "RETRY_MIN_BACKOFF_MS",
        "RETRY_MAX_BACKOFF_MS",
        "LOG_LEVEL",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.database_url == "sqlite:///./llm_jobs.db"
    assert settings.llm_provider is ProviderName.OPENROUTER
    assert settings.openrouter_base_url == "https://openrouter.ai/api/v1"
    assert settings.openrouter_api_key is None
    assert settings.generate_user_concurrency == 5
    assert settings.preview_user_concurrency == 10
    assert settings.job_retention_days == 7
    assert settings.cleanup_cron == "0 2 * * *"
    assert (settings.retry_min_backoff_ms, settings.retry_max_backoff_ms) == (2000, 60000)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GENERATE_USER_CONCURRENCY", "0"),
        ("PREVIEW_USER_CONCURRENCY", "many"),
        ("LLM_PROVIDER", "gpt-bridge"),
        ("CLEANUP_CRON", "nightly"),
        ("JOB_RETENTION_DAYS", "-1"),
        ("DATABASE_URL", "mysql://db"),
        ("REDIS_URL", "localhost:6379"),
    ],
)
def test_an_invalid_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_settings()


def test_backoff_bounds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_MIN_BACKOFF_MS", "5000")
    monkeypatch.setenv("RETRY_MAX_BACKOFF_MS", "100")
    with pytest.raises(ConfigurationError, match="RETRY_MIN_BACKOFF_MS"):
        load_settings()


def test_keys_are_secret_and_never_in_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-very-secret")
    settings = load_settings()
    assert "sk-or-very-secret" not in repr(settings)
    assert "sk-or-very-secret" not in str(settings.model_dump())
    monkeypatch.setenv("GENERATE_USER_CONCURRENCY", "sk-or-very-secret")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "sk-or-very-secret" not in str(caught.value)

"""Payload validation: bad input is refused with a message naming the field, without echoing it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from actors.payloads import GenerateMessage, PreviewMessage, describe_validation_error, salvage_identity

VALID_PARAMS: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _error_for(payload: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        GenerateMessage.model_validate(payload)
    return describe_validation_error(caught.value)


def test_a_valid_generation_payload_passes() -> None:
    message = GenerateMessage.model_validate(
        {"job_id": "j1", "user_id": "u1", "params": {**VALID_PARAMS, "temperature": 0.7, "stop": ["\n"]}}
    )
    assert message.params.temperature == 0.7


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"messages": VALID_PARAMS["messages"]}, "params.model"),
        ({"model": "m", "messages": []}, "params.messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "params.messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 42}]}, "params.messages.0.content"),
        ({**VALID_PARAMS, "temperature": 5}, "params.temperature"),
        ({**VALID_PARAMS, "max_tokens": 0}, "params.max_tokens"),
        ({**VALID_PARAMS, "top_p": 1.5}, "params.top_p"),
        ({**VALID_PARAMS, "tools": []}, "params.tools"),
        ({"model": "m", "messages": [{"role": "system", "content": "only a system prompt"}]}, "params.messages"),
    ],
)
def test_an_invalid_param_is_named_in_the_error(params: dict[str, Any], field: str) -> None:
    error = _error_for({"job_id": "j1", "user_id": "u1", "params": params})
    assert f"{field}:" in error


def test_an_empty_user_id_is_refused() -> None:
    assert "user_id:" in _error_for({"job_id": "j1", "user_id": "", "params": VALID_PARAMS})


def test_a_job_id_with_spaces_is_refused() -> None:
    assert "job_id:" in _error_for({"job_id": "has space", "user_id": "u1", "params": VALID_PARAMS})


def test_the_error_does_not_echo_the_prompt() -> None:
    secret_prompt = "my diary entry"
    error = _error_for(
        {
            "job_id": "j1",
            "user_id": "u1",
            "params": {"model": "m", "messages": [{"role": "x", "content": secret_prompt}]},
        }
    )
    assert secret_prompt not in error


def test_a_preview_needs_title_and_content_strings() -> None:
    with pytest.raises(ValidationError) as caught:
        PreviewMessage.model_validate({"job_id": "j1", "user_id": "u1", "title": None, "content": 3})
    error = describe_validation_error(caught.value)
    assert "title:" in error
    assert "content:" in error


def test_identity_is_salvaged_from_an_invalid_payload_when_usable() -> None:
    assert salvage_identity({"job_id": "j1", "user_id": "u1", "params": None}) == ("j1", "u1")
    assert salvage_identity({"job_id": "j1", "user_id": 7}) == ("j1", "")
    assert salvage_identity({"job_id": None, "user_id": "u1"}) == (None, "")

"""Pydantic models of what web code and broker messages carry; validated before anything is written."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, ValidationInfo, field_validator

from repositories.chat import ChatRequest, StorableText

JobId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
UserId = Annotated[StorableText, StringConstraints(min_length=1, max_length=255)]

#: The request size limit when validation is given none (``MAX_REQUEST_BYTES`` sets it: ``limits_context``).
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024


def limits_context(max_request_bytes: int) -> dict[str, Any]:
    """The pydantic validation context that applies ``max_request_bytes`` to a message."""
    return {"max_request_bytes": max_request_bytes}


def _check_size(size: int, info: ValidationInfo) -> None:
    limit = (info.context or {}).get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
    if size > limit:
        raise ValueError(f"request is {size} bytes as JSON, above the limit of {limit} (MAX_REQUEST_BYTES)")


def is_job_id(value: object) -> bool:
    """True when ``value`` can be a job id (so looking it up can find a job)."""
    try:
        JobRef.model_validate({"job_id": value, "user_id": "-"})
    except ValidationError:
        return False
    return True


#: What web code may pass as ``params``: a dict or this model.
GenerationParams = ChatRequest


def new_job_id() -> str:
    """A fresh, unique job id."""
    return uuid.uuid4().hex


class GenerateMessage(BaseModel):
    """The payload of ``generate_llm_response``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId
    user_id: UserId
    params: GenerationParams

    @field_validator("params")
    @classmethod
    def _params_fit_the_size_limit(cls, params: GenerationParams, info: ValidationInfo) -> GenerationParams:
        _check_size(len(params.model_dump_json(exclude_none=True).encode()), info)
        return params


class PreviewMessage(BaseModel):
    """The payload of ``generate_preview``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId
    user_id: UserId
    title: Annotated[StorableText, StringConstraints(max_length=1_000)]
    content: Annotated[StorableText, StringConstraints(max_length=500_000)]

    @field_validator("content")
    @classmethod
    def _request_fits_the_size_limit(cls, content: str, info: ValidationInfo) -> str:
        title = info.data.get("title") or ""
        _check_size(len(json.dumps({"title": title, "content": content}, ensure_ascii=False).encode()), info)
        return content


class JobRef(BaseModel):
    """The payload of ``cancel_llm_job``: a job and the user asking."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId
    user_id: UserId


def describe_validation_error(
    error: ValidationError, *, what: str = "payload", options: Mapping[str, str] | None = None
) -> str:
    """One line naming each bad field and what is wrong, without echoing the input (it may be a prompt).

    ``what`` names the input (``invalid <what>: ...``); ``options`` maps field names to the command-line
    options that set them, shown with the field (``--model (params.model): ...``)."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or what
        option = next(
            (flag for name, flag in (options or {}).items() if field == name or field.startswith(name + ".")), None
        )
        problems.append(f"{option} ({field}): {item['msg']}" if option else f"{field}: {item['msg']}")
    return f"invalid {what}: " + "; ".join(problems)


def salvage_identity(payload: dict[str, Any]) -> tuple[str | None, str]:
    """The job id and user id of an invalid payload, when they are usable, to record the failure under."""
    job_id = payload.get("job_id")
    user_id = payload.get("user_id")
    try:
        JobRef(job_id=job_id, user_id=user_id)
    except ValidationError:
        try:
            JobRef(job_id=job_id, user_id="unknown")
        except ValidationError:
            return None, ""
        return str(job_id), ""
    return str(job_id), str(user_id)

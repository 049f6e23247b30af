"""Pydantic models of what web code and broker messages carry; validated before anything is written."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from repositories.chat import ChatRequest

JobId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=255)]

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


class PreviewMessage(BaseModel):
    """The payload of ``generate_preview``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId
    user_id: UserId
    title: Annotated[str, StringConstraints(max_length=1_000)]
    content: Annotated[str, StringConstraints(max_length=500_000)]


class JobRef(BaseModel):
    """The payload of ``cancel_llm_job``: a job and the user asking."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId
    user_id: UserId


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field and what is wrong, without echoing the input (it may be a prompt)."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "payload"
        problems.append(f"{field}: {item['msg']}")
    return "invalid payload: " + "; ".join(problems)


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

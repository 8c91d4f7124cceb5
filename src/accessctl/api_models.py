"""The HTTP API's request and response bodies, and its opaque pagination cursor.

Bodies are strict (no coercion of numbers to strings, no unknown fields), so a client's
mistake is refused with a 4xx naming it instead of being filed as something else. The
user IDs inside are validated by the same code as the CLI's (inputs.py), so they are
refused with the same messages.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from accessctl.exceptions import UsageError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmitBody(_Strict):
    """``POST /submit``: like ``accessctl submit``. No body, or no ``user_ids``, files the
    configured default IDs."""

    user_ids: list[StrictStr] | None = Field(
        default=None, description="User IDs (UUIDs). Default: the configured IDs."
    )
    skip_invalid: StrictBool = Field(
        default=False,
        description="File the valid IDs and record each malformed one in errors "
        "(else: 422, nothing filed).",
    )


class BatchBody(_Strict):
    """``POST /batch/{count}``: like ``accessctl batch N --user ...``."""

    users: list[StrictStr] | None = Field(
        default=None, description="User IDs to cycle over. Default: the configured IDs."
    )


class FiledBatch(BaseModel):
    batch_id: str
    key: str | None
    total: int
    filed: bool = Field(
        description="true: filed by this request (202); false: the Idempotency-Key named a "
        "batch already filed with the same input, which this answer attaches to (200)."
    )


class ErrorRow(BaseModel):
    id: str
    created_at: str
    message: dict[str, Any]


class ErrorPage(BaseModel):
    errors: list[ErrorRow]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= (with the same filters) for the next, older page; "
        "null on the last page."
    )


class BatchReport(BaseModel):
    batch_id: str
    key: str | None
    created_at: str
    total: int
    recorded: int
    failed: int
    state: str
    retry_of: str | None
    done: int | None = None


class ApiErrorBody(BaseModel):
    error: str
    status: int


class Health(BaseModel):
    status: str


def encode_cursor(position: tuple[datetime, uuid.UUID]) -> str:
    """An opaque cursor for the keyset position (created_at, id) of a page's last row."""
    created_at, error_id = position
    raw = json.dumps([created_at.isoformat(), str(error_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor from ``encode_cursor`` names; UsageError for anything else."""
    refused = UsageError(f"cursor {text[:40]!r} is not one this server gave out")
    if len(text) > 200:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, error_id = json.loads(raw)
        position = (datetime.fromisoformat(created_at), uuid.UUID(error_id))
    except (ValueError, TypeError):  # bad base64, JSON, shape, date or UUID
        raise refused from None
    if position[0].tzinfo is None:
        raise refused
    return position

"""Adding and importing users, so that access requests for them can succeed."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from accessctl.exceptions import UsageError
from accessctl.inputs import MAX_LISTED
from accessctl.models import User

if TYPE_CHECKING:
    pass

_EMAIL = re.compile(r"[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+")


@dataclass(frozen=True)
class NewUser:
    name: str
    email: str
    id: uuid.UUID


def validate_user(name: str, email: str, user_id: str | None) -> NewUser:
    """A user as given, or ValueError naming what is wrong."""
    name = name.strip()
    email = email.strip()
    if not name:
        raise ValueError("name is empty")
    if "\x00" in name or "\x00" in email:
        raise ValueError("contains a NUL byte")
    for label, value in (("name", name), ("email", email)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{label} is not valid UTF-8 text") from None
    if user_id is not None and not isinstance(user_id, str):
        raise ValueError(f"id {user_id!r} is not a UUID string")
    if len(name) > 200:
        raise ValueError(f"name is {len(name)} characters; the maximum is 200")
    if len(email) > 320 or not _EMAIL.fullmatch(email):
        raise ValueError(f"email {email[:60]!r} is not an email address")
    try:
        parsed_id = uuid.UUID(user_id) if user_id else uuid.uuid4()
    except ValueError:
        raise ValueError(f"id {str(user_id)[:40]!r} is not a UUID") from None
    return NewUser(name=name, email=email.lower(), id=parsed_id)


def add_user(engine: sa.Engine, name: str, email: str, user_id: str | None) -> str:
    try:
        user = validate_user(name, email, user_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    added, _ = _insert(engine, [user])
    if not added:
        # Say which of the two is taken: the operator fixes that one.
        with engine.connect() as conn:
            owner = conn.scalar(sa.select(User.id).where(User.email == user.email))
            id_taken = conn.scalar(sa.select(User.id).where(User.id == user.id)) is not None
        taken = []
        if owner is not None:
            taken.append(f"email {user.email!r} already belongs to user {owner}")
        if id_taken:
            taken.append(f"id {user.id} is already taken")
        raise UsageError("; ".join(taken) or f"user {user.id} could not be added")
    return str(user.id)


def parse_user_file(text: str) -> list[NewUser]:
    """CSV with a header (``name,email[,id]``) or JSON lines (``{"name", "email", "id"?}``).
    Every bad row is reported at once; nothing is imported if any is bad."""
    stripped = text.lstrip()
    problems: list[str] = []
    users: list[NewUser] = []
    if stripped.startswith("{"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("is not a JSON object")
                users.append(
                    validate_user(
                        str(row.get("name", "")), str(row.get("email", "")), row.get("id")
                    )
                )
            except json.JSONDecodeError:
                problems.append(f"line {line_no}: not valid JSON")
            except ValueError as exc:
                problems.append(f"line {line_no}: {exc}")
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"name", "email"} <= set(reader.fieldnames):
            raise UsageError("user file: expected a CSV header with name,email[,id] or JSON lines")
        for row in reader:
            try:
                users.append(
                    validate_user(row.get("name") or "", row.get("email") or "", row.get("id"))
                )
            except ValueError as exc:
                problems.append(f"line {reader.line_num}: {exc}")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UsageError(f"{len(problems)} bad row(s), nothing imported: {listed}{more}")
    if not users:
        raise UsageError("user file holds no users")
    return users


def _insert(engine: sa.Engine, users: list[NewUser]) -> tuple[int, int]:
    """Insert users whose email and id are new, in one transaction. Returns (added, skipped)."""
    emails = [u.email for u in users]
    ids = [u.id for u in users]
    with engine.begin() as conn:
        existing_emails = set(
            conn.scalars(sa.select(User.email).where(User.email.in_(emails))).all()
        )
        existing_ids = set(conn.scalars(sa.select(User.id).where(User.id.in_(ids))).all())
        seen: set[str] = set()
        fresh = []
        for u in users:
            if u.email in existing_emails or u.id in existing_ids or u.email in seen:
                continue
            seen.add(u.email)
            fresh.append({"id": u.id, "name": u.name, "email": u.email})
        if fresh:
            from accessctl.models import utcnow

            now = utcnow()
            conn.execute(
                sa.insert(User), [{**row, "created_at": now, "updated_at": now} for row in fresh]
            )
    return len(fresh), len(users) - len(fresh)


def import_users(engine: sa.Engine, text: str) -> tuple[int, int]:
    return _insert(engine, parse_user_file(text))

"""The tables as people see them: exact output at 80 and 120 columns, from plain data
(no database), so a change to a column's width or order shows up here first."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from rich.console import Console

from accessctl import render

B1 = "a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31"
B2 = "5769fa06-4bd0-4c59-9f0a-0c7e8e8d2b11"
U1 = "00000000-0000-0000-0000-000000000003"
U2 = "3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60"
ERRORS: list[dict[str, Any]] = [
    {
        "id": "5833af50-6c51-4a73-ba5a-048294657df3",
        "created_at": "2026-11-30T14:32:16.794579+00:00",
        "message": {
            "batch_id": B1,
            "workflow_id": f"req-{B1}-0000003",
            "user_id": U1,
            "error_class": "UnknownUser",
            "detail": f"no user with id {U1}",
            "sqlstate": None,
        },
    },
    {
        "id": "c2f4a9e1-0b7d-4e65-a1f3-9d8c7b6a5e40",
        "created_at": "2026-11-30T14:32:15.000001+00:00",
        "message": {
            "batch_id": B1,
            "workflow_id": None,
            "user_id": None,
            "error_class": "InvalidUserId",
            "detail": "is not a UUID",
            "input": "not-a-uuid",
            "line": 3,
            "sqlstate": None,
        },
    },
    {
        "id": "e1d2c3b4-a5f6-4789-9abc-def012345678",
        "created_at": "2026-11-30T14:30:00+00:00",
        "message": {
            "batch_id": B2,
            "workflow_id": f"req-{B2}-0000000",
            "user_id": U2,
            "error_class": "ProviderRefused",
            "detail": '403 Forbidden: {"error": "user is suspended"}',
            "http_status": 403,
            "attempt": 1,
            "sqlstate": None,
        },
    },
]
BATCHES: list[dict[str, Any]] = [
    {
        "batch_id": B1,
        "key": "nightly-2026-11-30",
        "created_at": "2026-11-30T14:32:15.123456+00:00",
        "total": 1200,
        "recorded": 1197,
        "failed": 3,
        "state": "done",
        "retry_of": None,
    },
    {
        "batch_id": B2,
        "key": None,
        "created_at": "2026-11-30T14:29:59.999999+00:00",
        "total": 4,
        "recorded": 0,
        "failed": 1,
        "state": "cancelling",
        "retry_of": B1,
    },
]
ACCESSES: list[dict[str, Any]] = [
    {
        "id": "9b2e4d6f-1a3c-4e5f-8a7b-0c9d8e7f6a5b",
        "user_id": U2,
        "status": "requested",
        "batch_id": B1,
        "request_id": f"req-{B1}-0000000",
        "created_at": "2026-11-30T14:32:16.5+00:00",
        "updated_at": "2026-11-30T14:40:00+00:00",
    },
    {
        "id": "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9",
        "user_id": U1,
        "status": "approved",
        "batch_id": None,
        "request_id": None,
        "created_at": "2026-11-29T08:00:00+00:00",
        "updated_at": "2026-11-30T09:15:00+00:00",
    },
]
USERS: list[dict[str, Any]] = [
    {
        "id": U2,
        "name": "Ada Lovelace",
        "email": "ada.lovelace@analytical-engines.example.com",
        "created_at": "2026-11-30T14:00:00.5+00:00",
    },
    {
        "id": U1,
        "name": "Grace",
        "email": "grace@example.com",
        "created_at": "2026-11-29T08:00:00+00:00",
    },
]
RETRY: list[dict[str, Any]] = [
    {
        "error_id": "5833af50-6c51-4a73-ba5a-048294657df3",
        "user_id": U1,
        "error_class": "UnknownUser",
        "idempotency_key": None,
        "detail": f"no user with id {U1}",
    },
    {
        "error_id": "e1d2c3b4-a5f6-4789-9abc-def012345678",
        "user_id": U2,
        "error_class": "ProviderUnavailable",
        "idempotency_key": f"req-{B2}-0000000",
        "detail": "503 after 5 attempts",
    },
]
STATUS: dict[str, Any] = {
    "batch_id": B1,
    "key": "nightly-2026-11-30",
    "created_at": "2026-11-30T14:32:15.123456+00:00",
    "total": 1200,
    "recorded": 1197,
    "failed": 3,
    "state": "done",
    "retry_of": None,
    "done": 1200,
}


def rendered(function: Callable[..., None], data: Any, width: int, **options: Any) -> str:
    console = Console(
        file=io.StringIO(), width=width, no_color=True, highlight=False, soft_wrap=False
    )
    function(data, console=console, **options)
    output: str = console.file.getvalue()  # type: ignore[attr-defined]
    return output


GOLDEN = {
    ("print_errors", "ERRORS", 80): """\
3 error(s), newest first (-o wide adds detail, batch, error)
created                class             user
─────────────────────────────────────────────────────────────────────────────
2026-11-30 14:32:16Z   UnknownUser       00000000-0000-0000-0000-000000000003
2026-11-30 14:32:15Z   InvalidUserId     'not-a-uuid'
2026-11-30 14:30:00Z   ProviderRefused   3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60
""",
    ("print_errors", "ERRORS", 120): """\
3 error(s), newest first (-o wide adds batch, error)
created                class             user                                   detail
────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
2026-11-30 14:32:16Z   UnknownUser       00000000-0000-0000-0000-000000000003   no user with id 00000000-0000-0000-0000…
2026-11-30 14:32:15Z   InvalidUserId     'not-a-uuid'                           input 'not-a-uuid' (line 3): is not a U…
2026-11-30 14:30:00Z   ProviderRefused   3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   403 Forbidden: {"error": "user is suspe…
""",
    ("print_batches", "BATCHES", 80): """\
2 batch(es), newest first (-o wide adds created, key, retry of)
batch                                  state        total   recorded   failed
─────────────────────────────────────────────────────────────────────────────
a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31   done         1200    1197       3
5769fa06-4bd0-4c59-9f0a-0c7e8e8d2b11   cancelling   4       0          1
""",
    ("print_batches", "BATCHES", 120): """\
2 batch(es), newest first (-o wide adds retry of)
batch                                  state        total   recorded   failed   created                key
────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31   done         1200    1197       3        2026-11-30 14:32:15Z   nightly-2026-11-…
5769fa06-4bd0-4c59-9f0a-0c7e8e8d2b11   cancelling   4       0          1        2026-11-30 14:29:59Z   -
""",
    ("print_accesses", "ACCESSES", 80): """\
2 access(es) (-o wide adds user, batch, updated)
id                                     status      created
───────────────────────────────────────────────────────────────────────
9b2e4d6f-1a3c-4e5f-8a7b-0c9d8e7f6a5b   requested   2026-11-30 14:32:16Z
1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9   approved    2026-11-29 08:00:00Z
""",
    ("print_accesses", "ACCESSES", 120): """\
2 access(es) (-o wide adds batch, updated)
id                                     status      user                                   created
──────────────────────────────────────────────────────────────────────────────────────────────────────────────
9b2e4d6f-1a3c-4e5f-8a7b-0c9d8e7f6a5b   requested   3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   2026-11-30 14:32:16Z
1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9   approved    00000000-0000-0000-0000-000000000003   2026-11-29 08:00:00Z
""",
    ("print_users", "USERS", 80): """\
2 user(s) (-o wide adds created)
id                                     email                        name
────────────────────────────────────────────────────────────────────────────────
3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   ada.lovelace@analytical-e…   Ada Lovelace
00000000-0000-0000-0000-000000000003   grace@example.com            Grace
""",
    ("print_users", "USERS", 120): """\
2 user(s)
id                                     email                                         name           created
────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   ada.lovelace@analytical-engines.example.com   Ada Lovelace   2026-11-30 14:00:00Z
00000000-0000-0000-0000-000000000003   grace@example.com                             Grace          2026-11-29 08:00:00Z
""",
    ("print_retry_plan", "RETRY", 80): """\
2 request(s) would be retried (-o wide adds key, error)
user                                   class                 detail
────────────────────────────────────────────────────────────────────────────────
00000000-0000-0000-0000-000000000003   UnknownUser           no user with id 00…
3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   ProviderUnavailable   503 after 5 attemp…
""",
    ("print_retry_plan", "RETRY", 120): """\
2 request(s) would be retried (-o wide adds key, error)
user                                   class                 detail
─────────────────────────────────────────────────────────────────────────────────────────────────────────────────
00000000-0000-0000-0000-000000000003   UnknownUser           no user with id 00000000-0000-0000-0000-000000000003
3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   ProviderUnavailable   503 after 5 attempts
""",
    ("print_summary", "STATUS", 80): """\
batch a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31
field        value
─────────────────────────────────────────────────
batch_id     a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31
key          nightly-2026-11-30
created_at   2026-11-30 14:32:15Z
total        1200
recorded     1197
failed       3
state        done
retry_of     -
done         1200
""",
    ("print_errors_wide", "ERRORS", 80): """\
3 error(s), newest first
created                class             user                                   detail                                                 batch                                  error
──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
2026-11-30 14:32:16Z   UnknownUser       00000000-0000-0000-0000-000000000003   no user with id 00000000-0000-0000-0000-000000000003   a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31   5833af50-6c51-4a73-ba5a-048294657df3
2026-11-30 14:32:15Z   InvalidUserId     'not-a-uuid'                           input 'not-a-uuid' (line 3): is not a UUID             a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31   c2f4a9e1-0b7d-4e65-a1f3-9d8c7b6a5e40
2026-11-30 14:30:00Z   ProviderRefused   3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60   403 Forbidden: {"error": "user is suspended"}          5769fa06-4bd0-4c59-9f0a-0c7e8e8d2b11   e1d2c3b4-a5f6-4789-9abc-def012345678
""",
}


@pytest.mark.parametrize("case", list(GOLDEN), ids=lambda c: f"{c[0]}-{c[2]}")
def test_tables_render_exactly(case: tuple[str, str, int]) -> None:
    name, data_name, width = case
    data = globals()[data_name]
    wide = name.endswith("_wide")
    function = getattr(render, name.removesuffix("_wide"))
    assert rendered(function, data, width, **({"wide": True} if wide else {})) == GOLDEN[case]


@pytest.mark.parametrize("width", [60, 80, 100, 120, 160, 240])
@pytest.mark.parametrize(
    ("function", "data", "ids"),
    [
        (render.print_errors, ERRORS, [U1, U2]),
        (render.print_batches, BATCHES, [B1, B2]),
        (render.print_accesses, ACCESSES, [a["id"] for a in ACCESSES]),
        (render.print_users, USERS, [U1, U2]),
        (render.print_retry_plan, RETRY, [U1, U2]),
    ],
)
def test_at_any_width_ids_are_whole_and_lines_fit(
    function: Callable[..., None], data: Any, ids: list[str], width: int
) -> None:
    text = rendered(function, data, width)
    lines = text.splitlines()
    for line in lines:
        assert len(line) <= width, line
    if width >= 80:  # narrower, an ID column may be left out, never cut
        for value in ids:
            assert value in text
    # No timestamp with microseconds or an offset: compact UTC.
    assert "+00:00" not in text and ".794579" not in text
    # Every row is one line: the title (it may wrap), a header, a rule, one line per row.
    rule = next(i for i, line in enumerate(lines) if line.startswith("───"))
    assert len(lines) - rule - 1 == len(data)


def test_wide_shows_every_column_in_full() -> None:
    text = rendered(render.print_errors, ERRORS, 80, wide=True)
    for error in ERRORS:
        assert error["id"] in text and error["message"]["batch_id"] in text
        assert str(error["message"]["detail"]) in text
    assert "(-o wide" not in text


def test_compact_time() -> None:
    assert render.compact_time("2026-11-30T14:32:16.794579+00:00") == "2026-11-30 14:32:16Z"
    assert render.compact_time("2026-11-30T09:32:16-05:00") == "2026-11-30 14:32:16Z"
    assert render.compact_time("not a time") == "not a time"
    assert render.compact_time(None) is None

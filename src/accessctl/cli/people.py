"""People and their accesses: ``users add|import|list`` and ``accesses
list|approve|reject|cancel``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from accessctl.cli.common import (
    JsonOption,
    LimitOption,
    OutputOption,
    _list,
    _settings,
    command,
    handles_errors,
)


@command("add", epilog="Example: accessctl users add --name 'Ada' --email ada@example.com")
@handles_errors
def users_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(metavar="NAME", help="Display name.")],
    email: Annotated[str, typer.Option(metavar="EMAIL", help="Email address (unique).")],
    user_id: Annotated[
        str | None, typer.Option("--id", metavar="UUID", help="Use this UUID.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Add one user and print its ID."""
    from accessctl.render import print_json
    from accessctl.runtime import database
    from accessctl.users import add_user

    with database(_settings(ctx)) as engine:
        new_id = add_user(engine, name, email, user_id)
    if as_json:
        print_json({"id": new_id})
    else:
        typer.echo(new_id)


@command("import", epilog="Example: accessctl users import people.csv")
@handles_errors
def users_import(
    ctx: typer.Context,
    path: Annotated[
        str, typer.Argument(metavar="FILE", help="CSV (name,email[,id]) or JSON lines; '-': stdin.")
    ],
    as_json: JsonOption = False,
) -> None:
    """Import users from CSV or JSON lines; existing emails are skipped. All or nothing."""
    from accessctl.files import USERS_FILE
    from accessctl.inputs import read_lines
    from accessctl.render import print_json
    from accessctl.runtime import database
    from accessctl.users import import_users

    text = "\n".join(line for _, line in read_lines(path, sys.stdin, "user file", USERS_FILE))
    with database(_settings(ctx)) as engine:
        added, skipped = import_users(engine, text)
    if as_json:
        print_json({"added": added, "skipped": skipped})
    else:
        typer.echo(f"added {added}, skipped {skipped} existing")


@command("list", epilog="Example: accessctl users list --json")
@handles_errors
def users_list(
    ctx: typer.Context,
    limit: LimitOption = 100,
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """List users, newest first."""
    from accessctl.queries import list_users
    from accessctl.render import print_users

    _list(ctx, output, as_json, lambda engine: list_users(engine, limit=limit), print_users)


# --- accesses -------------------------------------------------------------------------------


@command("list", epilog="Example: accessctl accesses list --status requested --json")
@handles_errors
def accesses_list(
    ctx: typer.Context,
    status: Annotated[
        str | None,
        typer.Option(metavar="STATUS", help="requested, approved, rejected or canceled."),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", metavar="USER_ID", help="Only this user (ID or unique prefix)."),
    ] = None,
    limit: LimitOption = 100,
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """List accesses, newest first."""
    from accessctl.accesses import list_accesses
    from accessctl.render import print_accesses

    _list(
        ctx,
        output,
        as_json,
        lambda engine: list_accesses(engine, status=status, user=user, limit=limit),
        print_accesses,
    )


def _transition(ctx: typer.Context, access_ids: list[str], target: str) -> None:
    from accessctl.accesses import transition
    from accessctl.models import AccessStatus
    from accessctl.runtime import database

    with database(_settings(ctx)) as engine:
        changed = transition(engine, access_ids, AccessStatus(target))
    typer.echo(f"{changed} access(es) now {target}")


AccessIds = Annotated[
    list[str],
    typer.Argument(metavar="ACCESS_ID...", help="Access IDs, or unique prefixes of them."),
]


@command("approve", epilog="Example: accessctl accesses approve 6f1e2d3c 9b2e4d6f")
@handles_errors
def accesses_approve(ctx: typer.Context, access_ids: AccessIds) -> None:
    """Approve requested accesses (all or none)."""
    _transition(ctx, access_ids, "approved")


@command("reject", epilog="Example: accessctl accesses reject 6f1e2d3c")
@handles_errors
def accesses_reject(ctx: typer.Context, access_ids: AccessIds) -> None:
    """Reject requested accesses (all or none)."""
    _transition(ctx, access_ids, "rejected")


@command("cancel", epilog="Example: accessctl accesses cancel 6f1e2d3c")
@handles_errors
def accesses_cancel(ctx: typer.Context, access_ids: AccessIds) -> None:
    """Cancel requested or approved accesses (all or none)."""
    _transition(ctx, access_ids, "canceled")

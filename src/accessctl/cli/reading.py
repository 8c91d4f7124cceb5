"""Reading: ``errors``, ``status``, ``config`` and ``batches``. Read-only, on a checked
database; nothing here files or changes anything."""

from __future__ import annotations

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


@command(epilog="Example: accessctl errors --since 2h --json | jq '.[].message.user_id'")
@handles_errors
def errors(
    ctx: typer.Context,
    batch: Annotated[
        str | None,
        typer.Option("--batch", metavar="BATCH_ID", help="Only this batch (ID or unique prefix)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(metavar="WHEN", help="Only newer than a duration (30m, 2h, 7d) or ISO time."),
    ] = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Recorded failures, newest first."""
    from accessctl.queries import list_errors
    from accessctl.render import print_errors

    _list(
        ctx,
        output,
        as_json,
        lambda engine: list_errors(engine, batch=batch, since=since, limit=limit),
        print_errors,
    )


@command(epilog="Example: accessctl status a07ff062 --json   # a unique prefix is enough")
@handles_errors
def status(
    ctx: typer.Context,
    batch_id: Annotated[
        str | None,
        typer.Argument(
            metavar="BATCH_ID", help="Batch ID or unique prefix (default: the newest batch)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Progress and outcome of a batch, readable from any process while it runs."""
    from accessctl.queries import batch_status
    from accessctl.render import print_json, print_mapping
    from accessctl.runtime import database

    settings = _settings(ctx)
    with database(settings) as engine:
        result = batch_status(engine, batch_id)
    if as_json:
        print_json(result)
    else:
        print_mapping(f"batch {result['batch_id']}", result)


@command(epilog="Example: accessctl config --json   # passwords hidden")
@handles_errors
def config(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the resolved configuration (passwords hidden) and where each value came from."""
    from accessctl.render import print_json, print_mapping

    view = _settings(ctx).public_view()
    if as_json:
        print_json(view)
    else:
        sources = view.pop("sources")
        print_mapping(
            "configuration",
            {k: f"{_shown(v)}  ({sources.get(k, 'default')})" for k, v in view.items()},
        )


def _shown(value: object) -> str:
    """A setting as the table shows it: unset is "none" (as in `limit set none`), a list
    its items (JSON keeps null and lists)."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


@command(epilog="Example: accessctl batches --limit 10 -o jsonl")
@handles_errors
def batches(
    ctx: typer.Context,
    limit: LimitOption = 20,
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Recent batches, newest first, with their counts and state.

    States: queued (filed, not yet started), running, interrupted (its process died; the
    next run or any worker resumes it), cancelling, done, cancelled, failed (its follower
    ended with requests missing and nothing left running).
    """
    from accessctl.queries import list_batches
    from accessctl.render import print_batches

    _list(
        ctx,
        output,
        as_json,
        lambda engine: list_batches(engine, limit=limit),
        print_batches,
        id_field="batch_id",
    )

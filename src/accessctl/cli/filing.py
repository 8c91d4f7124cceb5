"""Filing batches: ``submit``, ``batch``, ``retry`` and ``cancel``. Each parses its input
into a ``BatchRequest`` and hands it to ``attached.file_request``, which files it detached
or attached and decides the exit code; here the outcome is only rendered."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from accessctl.cli.common import (
    DetachOption,
    JsonOption,
    KeyOption,
    MetricsOption,
    OutputOption,
    _output,
    _settings,
    command,
    handles_errors,
)
from accessctl.clicore import CountCommand
from accessctl.exceptions import UsageError

if TYPE_CHECKING:
    from accessctl.batches import BatchRequest
    from accessctl.settings import Settings


def _file(
    settings: Settings,
    request: BatchRequest,
    *,
    detach: bool,
    as_json: bool,
    metrics_file: str | None = None,
    job: str = "submit",
) -> None:
    """File the batch (attached.py does the work) and render its outcome."""
    from accessctl.attached import file_request
    from accessctl.render import print_json, print_summary

    outcome = file_request(settings, request, detach=detach, metrics_file=metrics_file, job=job)
    if as_json:
        print_json(outcome.report)
    elif outcome.detached:
        typer.echo(outcome.report["batch_id"])
    else:
        print_summary(outcome.report)
    if outcome.exit_code:
        raise typer.Exit(int(outcome.exit_code))


FileOption = Annotated[
    str | None,
    typer.Option(
        "--file",
        "-f",
        metavar="PATH",
        help="Read user IDs from PATH, one per line ('-': stdin).",
    ),
]
SkipInvalidOption = Annotated[
    bool,
    typer.Option(
        "--skip-invalid",
        help="File the valid IDs and record each malformed one in `errors` (else: exit 2).",
    ),
]


@command(
    epilog="Example: accessctl submit 3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60 --key nightly-2026-11-28"
)
@handles_errors
def submit(
    ctx: typer.Context,
    user_ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="USER_ID...",
            help="User IDs (UUIDs); '-' reads stdin. Default: the configured IDs "
            "(ACCESSCTL_DEFAULT_USERS).",
        ),
    ] = None,
    file: FileOption = None,
    key: KeyOption = None,
    skip_invalid: SkipInvalidOption = False,
    detach: DetachOption = False,
    as_json: JsonOption = False,
    metrics_file: MetricsOption = None,
) -> None:
    """File one batch: an access request for each given user.

    With no IDs, files the configured default IDs (ACCESSCTL_DEFAULT_USERS).
    """
    from accessctl.batches import BatchRequest
    from accessctl.inputs import collect_user_ids, parse_key

    settings = _settings(ctx)
    key = parse_key(key)
    args = list(user_ids or [])
    if not args and file is None:
        args = list(settings.default_users)
    parsed = collect_user_ids(args, file, sys.stdin, skip_invalid=skip_invalid)
    if not parsed.user_ids and not parsed.invalid:
        raise UsageError("no user IDs given (arguments, --file or stdin were empty)")
    if len(parsed.user_ids) > settings.max_batch:
        raise UsageError(
            f"{len(parsed.user_ids)} requests exceed the maximum batch of {settings.max_batch} "
            "(ACCESSCTL_MAX_BATCH)"
        )
    _file(
        settings,
        BatchRequest(user_ids=parsed.user_ids, invalid=parsed.invalid, key=key),
        detach=detach,
        as_json=as_json,
        metrics_file=metrics_file,
    )


@command(
    cls=CountCommand,
    epilog="Example: accessctl batch 40 --user 3f0c9a52-6f1e-4a53-9d0a-1c2b3d4e5f60 --json",
)
@handles_errors
def batch(
    ctx: typer.Context,
    count: Annotated[str, typer.Argument(metavar="N", help="Number of requests to file.")],
    users: Annotated[
        list[str] | None,
        typer.Option("--user", "-u", metavar="USER_ID", help="User ID to cycle over (repeatable)."),
    ] = None,
    file: FileOption = None,
    key: KeyOption = None,
    detach: DetachOption = False,
    as_json: JsonOption = False,
    metrics_file: MetricsOption = None,
) -> None:
    """File one batch of N requests, cycling over the default IDs (or --user / --file)."""
    from accessctl.batches import BatchRequest
    from accessctl.inputs import collect_user_ids, parse_count, parse_key

    settings = _settings(ctx)
    n = parse_count(count, settings.max_batch)
    key = parse_key(key)
    args = list(users or [])
    if not args and file is None:
        args = list(settings.default_users)
    try:
        parsed = collect_user_ids(args, file, sys.stdin, skip_invalid=False)
    except UsageError as exc:
        # `batch` has no --skip-invalid: point at what it does have.
        message = exc.message.split(" (use --skip-invalid", 1)[0]
        if message != exc.message:
            message += " (batch files only valid IDs; `submit --skip-invalid` records bad ones)"
        if users:  # its "arguments" are --user values: say so
            message = re.sub(r"\bargument (\d+):", r"--user \1:", message)
        raise UsageError(message) from None
    if not parsed.user_ids:
        raise UsageError("no user IDs to cycle over")
    cycled = [parsed.user_ids[i % len(parsed.user_ids)] for i in range(n)]
    _file(
        settings,
        BatchRequest(user_ids=cycled, invalid=[], key=key),
        detach=detach,
        as_json=as_json,
        metrics_file=metrics_file,
        job="batch",
    )


@command(epilog="Example: accessctl retry 5769fa06 --dry-run")
@handles_errors
def retry(
    ctx: typer.Context,
    batch_id: Annotated[
        str,
        typer.Argument(
            metavar="BATCH_ID",
            help="The batch whose failed requests to re-file (ID or unique prefix).",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be retried; file nothing.")
    ] = False,
    key: KeyOption = None,
    detach: DetachOption = False,
    as_json: JsonOption = False,
    output: OutputOption = None,
    metrics_file: MetricsOption = None,
) -> None:
    """File a new batch from a batch's failed requests, linked to it. Running it twice
    files one retry batch (its key defaults to retry-of-BATCH_ID). A batch with nothing to
    retry is a usage error (exit 2), with or without --dry-run."""
    from accessctl.batches import BatchRequest
    from accessctl.idprefix import resolve_with
    from accessctl.inputs import parse_key
    from accessctl.models import Batch
    from accessctl.queries import failed_requests, nothing_to_retry
    from accessctl.render import emit, print_retry_plan
    from accessctl.runtime import database

    settings = _settings(ctx)
    fmt = _output(output, as_json)
    key = parse_key(key)
    with database(settings) as engine:
        source = str(resolve_with(engine, Batch.id, batch_id, "batch ID"))
        failed = failed_requests(engine, source)
        if not failed:
            raise UsageError(nothing_to_retry(engine, source))
    key = key or f"retry-of-{source}"
    if dry_run:
        emit(failed, fmt, id_field="user_id", table=print_retry_plan)
        return
    request = BatchRequest(
        user_ids=[r["user_id"] for r in failed],
        invalid=[],
        key=key,
        retry_of=source,
        # A request the provider may have filed is re-sent under its original key.
        idempotency_keys=[r["idempotency_key"] for r in failed],
    )
    _file(
        settings,
        request,
        detach=detach,
        as_json=as_json,
        metrics_file=metrics_file,
        job="retry",
    )


@command(epilog="Example: accessctl cancel 5769fa06")
@handles_errors
def cancel(
    ctx: typer.Context,
    batch_id: Annotated[
        str, typer.Argument(metavar="BATCH_ID", help="The batch to stop (ID or unique prefix).")
    ],
    as_json: JsonOption = False,
) -> None:
    """Stop a batch: none of its requests starts any more, the ones in flight finish, and
    each one that never started is recorded as Cancelled (so `retry` can file it again)."""
    from accessctl.cancel import cancel_batch
    from accessctl.idprefix import resolve_with
    from accessctl.models import Batch
    from accessctl.render import print_json, print_mapping
    from accessctl.runtime import database, filing_client

    settings = _settings(ctx)
    with database(settings) as engine:
        source = str(resolve_with(engine, Batch.id, batch_id, "batch ID"))
        client = filing_client(settings, engine)
        try:
            result = cancel_batch(client, engine, source)
        finally:
            client.destroy()
    if as_json:
        print_json(result)
    else:
        print_mapping(f"batch {source}", result)

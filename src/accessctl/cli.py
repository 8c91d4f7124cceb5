"""The command-line interface: parse, call the core, render, exit. Nothing else lives here.

Heavy imports (DBOS, SQLAlchemy, drivers) happen inside the commands that need them, so
``accessctl --help`` stays fast and needs no database.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from typer.core import TyperCommand

from accessctl import __version__
from accessctl.clicore import AccessctlGroup, report_error
from accessctl.errors import AccessctlError, ExitCode, UsageError
from accessctl.settings import BOUNDS, Settings, resolve_settings

EXIT_CODES_HELP = (
    "Exit codes: 0 all requests recorded; 1 some requests failed (see `accessctl errors`); "
    "2 usage error (bad argument, input or setting value), nothing filed; 3 configuration "
    "file or database unusable or unreachable, or an internal error; "
    "4 schema not migrated (run `accessctl migrate`); 130/143 interrupted by SIGINT/SIGTERM "
    "(the batch resumes with the next run or any worker)."
)

app = typer.Typer(
    name="accessctl",
    cls=AccessctlGroup,
    help="File user access requests in bulk through durable, globally rate-limited DBOS "
    "workflows.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
users_app = typer.Typer(help="Add, import and list users, so that requests for them succeed.")
app.add_typer(users_app, name="users")
accesses_app = typer.Typer(help="List accesses and move them along their lifecycle.")
app.add_typer(accesses_app, name="accesses")
limit_app = typer.Typer(
    help="Show or change the shared rate limit: one limit, stored in the database, that "
    "every run and worker follows."
)
app.add_typer(limit_app, name="limit")

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> typer.Exit:
    """One line on stderr (and, if the command was asked for JSON, a JSON error object on
    stdout); the caller raises the returned Exit."""
    report_error(message, code)
    return typer.Exit(code)


def handles_errors(func: F) -> F:
    """Map every failure to one stderr line and its documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AccessctlError as exc:
            raise fail(exc.message, int(exc.exit_code)) from None
        except (typer.Exit, typer.Abort, click.ClickException):
            raise  # click's own control flow and usage errors
        except KeyboardInterrupt:
            raise fail("interrupted", int(ExitCode.INTERRUPTED)) from None
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError

            from accessctl.db import describe_db_error

            # Whatever the text, the configured URL's passwords are scrubbed from it.
            url = None
            ctx = kwargs.get("ctx")
            if isinstance(ctx, typer.Context) and ctx.obj:
                with contextlib.suppress(AccessctlError):
                    url = _settings(ctx).database_url
            if isinstance(exc, DBAPIError):
                raise fail(
                    f"database error: {describe_db_error(exc, url=url)}", int(ExitCode.CONFIG)
                ) from None
            # A bug of ours: one line for the operator, the traceback only with -v.
            import structlog

            structlog.get_logger("accessctl").debug("internal error", exc_info=exc)
            detail = describe_db_error(exc, url=url)[:200] if str(exc).strip() else ""
            raise fail(
                f"internal error: {type(exc).__name__}: {detail} (rerun with -v for the traceback)",
                int(ExitCode.CONFIG),
            ) from None

    return wrapper  # type: ignore[return-value]


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj["settings"]()
    return settings


def _version(value: bool) -> None:
    if value:
        typer.echo(f"accessctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="Database URL (sqlite:///PATH or postgresql+psycopg://...). "
            "[env: ACCESSCTL_DATABASE_URL]",
            show_default=False,
        ),
    ] = None,
    rate_limit: Annotated[
        str | None,
        typer.Option(
            metavar="LIMIT/SECONDS",
            help="The shared rate limit this deployment expects (e.g. 50/30, or none). It is "
            "stored in the database once, at `migrate` or the first run; after that a run "
            "whose value differs is refused (exit 2): only `accessctl limit set` changes it. "
            "[env: ACCESSCTL_RATE_LIMIT]",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Requests in flight at most, globally; shared and checked like "
            "--rate-limit. [env: ACCESSCTL_CONCURRENCY]",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            metavar="json|console",
            help="Log lines on stderr as JSON or for people (default: JSON unless stderr is "
            "a terminal). [env: ACCESSCTL_LOG_FORMAT]",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", metavar="PATH", help="dbos-config.yaml to read. [env: ACCESSCTL_CONFIG]"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    no_color: Annotated[
        bool, typer.Option("--no-color", help="No colour in tables. [env: NO_COLOR]")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
) -> None:
    """File user access requests in bulk through durable, rate-limited DBOS workflows."""
    import logging

    from accessctl.logs import configure_logging
    from accessctl.settings import _parse_log_format

    flags = {
        "database_url": database_url,
        "rate_limit": str(rate_limit) if rate_limit is not None else None,
        "concurrency": str(concurrency) if concurrency is not None else None,
        "log_format": log_format,
        "config_file": str(config) if config is not None else None,
    }
    fmt_text = log_format or os.environ.get("ACCESSCTL_LOG_FORMAT")
    try:
        origin = "--log-format" if log_format else "ACCESSCTL_LOG_FORMAT"
        fmt = _parse_log_format(fmt_text, origin) if fmt_text else None
    except AccessctlError as exc:
        raise fail(exc.message, int(exc.exit_code)) from None
    from accessctl.render import set_color

    set_color(not no_color)
    configure_logging(fmt, level=logging.DEBUG if verbose else logging.INFO)
    resolved: list[Settings] = []

    def settings() -> Settings:
        # Resolved on first use, so `--help` and `users --help` need no configuration.
        if not resolved:
            resolved.append(resolve_settings(flags))
            if fmt is None and resolved[0].log_format is not None:
                # Set only in dbos-config.yaml's env: section, read just now.
                configure_logging(
                    resolved[0].log_format, level=logging.DEBUG if verbose else logging.INFO
                )
        return resolved[0]

    ctx.obj = {"settings": settings}


# --- filing batches -------------------------------------------------------------------------


@contextmanager
def _signals() -> Iterator[tuple[threading.Event, Callable[[], ExitCode]]]:
    """First SIGINT/SIGTERM: stop waiting, let in-flight requests finish. Second: exit now
    (nothing is lost: the batch is durable)."""
    stop = threading.Event()
    received: list[int] = []

    def code() -> ExitCode:
        return (
            ExitCode.TERMINATED
            if received and received[0] == signal.SIGTERM
            else (ExitCode.INTERRUPTED)
        )

    def handler(signum: int, _frame: Any) -> None:
        if received:
            sys.stderr.write("accessctl: error: second signal, exiting now\n")
            os._exit(int(ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED))
        received.append(signum)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop, code
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _file(
    settings: Settings,
    user_ids: list[str],
    invalid: list[Any],
    key: str | None,
    *,
    detach: bool,
    as_json: bool,
    retry_of: str | None = None,
    idempotency_keys: list[str | None] | None = None,
    metrics_file: str | None = None,
    job: str = "submit",
) -> None:
    from accessctl.batches import BatchRequest, enqueue_detached, run_attached
    from accessctl.render import print_json, print_summary

    request = BatchRequest(
        user_ids=user_ids,
        invalid=invalid,
        key=key,
        retry_of=retry_of,
        idempotency_keys=idempotency_keys,
    )
    if detach:
        from accessctl.runtime import database

        with database(settings) as engine:
            # The same rule as an executing run: a limit given on purpose must match.
            batch_id = enqueue_detached(settings, engine, request)
        if as_json:
            print_json({"batch_id": batch_id, "key": key, "total": len(user_ids) + len(invalid)})
        else:
            typer.echo(batch_id)
        return

    import structlog

    from accessctl.metrics import recording_run, resolve_metrics_path
    from accessctl.progress import ProgressReporter
    from accessctl.runtime import executing_runtime

    metrics_path = resolve_metrics_path(metrics_file, settings.metrics_file)
    structlog.contextvars.bind_contextvars(batch_id=request.batch_id)
    try:
        with (
            _signals() as (stop, reason),
            executing_runtime(settings) as runtime,
            ProgressReporter(runtime.settings.rate_limit) as reporter,
            recording_run(metrics_path, runtime.engine, job=job) as record,
        ):
            summary = run_attached(
                request,
                settings,
                runtime.engine,
                runtime.client,
                poll_interval=runtime.settings.poll_interval,
                stop=stop,
                stop_reason=reason,
                on_progress=reporter.update,
            )
            record(summary)
    finally:
        structlog.contextvars.unbind_contextvars("batch_id")
    structlog.get_logger("accessctl").info("batch finished", **summary)
    if as_json:
        print_json(summary)
    else:
        print_summary(summary)
    if summary["failed"] or summary.get("state") not in ("done", "cancelled"):
        raise typer.Exit(int(ExitCode.SOME_FAILED))


KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="KEY",
        help="Idempotency key naming the batch (e.g. nightly-2026-11-28): the same key "
        "files one batch, however often or concurrently it runs.",
    ),
]
DetachOption = Annotated[
    bool, typer.Option("--detach", help="Enqueue and exit, printing the batch ID.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
MetricsOption = Annotated[
    str | None,
    typer.Option(
        "--metrics-file",
        metavar="PATH",
        help="Write Prometheus metrics to PATH at the end (node_exporter textfile "
        "collector; written atomically). [env: ACCESSCTL_METRICS_FILE]",
    ),
]
OutputOption = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        metavar="FORMAT",
        help="table, wide (every column, nothing cut), json, jsonl or ids (one ID a line).",
    ),
]


def _list(
    ctx: typer.Context,
    output: str | None,
    as_json: bool,
    fetch: Callable[[Any], list[dict[str, Any]]],
    table: Callable[[Any], None],
    id_field: str = "id",
) -> None:
    """Every listing command: pick the format, read on a checked database, emit."""
    from accessctl.render import emit
    from accessctl.runtime import database

    fmt = _output(output, as_json)
    with database(_settings(ctx)) as engine:
        rows = fetch(engine)
    emit(rows, fmt, id_field=id_field, table=table)


def _output(output: str | None, as_json: bool) -> str:
    from accessctl.render import OUTPUT_FORMATS

    if as_json and output not in (None, "json"):
        raise UsageError(f"--json and -o {output} disagree; give one of them")
    chosen = "json" if as_json else (output or "table")
    if chosen not in OUTPUT_FORMATS:
        raise UsageError(f"-o {chosen!r} is not one of: {', '.join(OUTPUT_FORMATS)}")
    return chosen


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


@app.command(
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
        parsed.user_ids,
        parsed.invalid,
        key,
        detach=detach,
        as_json=as_json,
        metrics_file=metrics_file,
    )


_NEGATIVE_NUMBER = re.compile(r"-\d[\d.,_]*(?:[eE][+-]?\d+)?")


class _CountCommand(TyperCommand):
    """``batch -1`` is a count out of bounds, not an unknown option ``-1``: say so in our
    one line, naming the bounds, before click's parser reports "No such option"."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        takes_value = {
            opt
            for param in self.params
            if param.param_type_name == "option" and not getattr(param, "is_flag", False)
            for opt in (*param.opts, *param.secondary_opts)
        }
        previous: str | None = None
        for token in args:
            if token == "--":
                break
            if previous not in takes_value and _NEGATIVE_NUMBER.fullmatch(token):
                from accessctl.inputs import parse_count

                try:
                    parse_count(token, _settings(ctx).max_batch)
                except AccessctlError as exc:
                    raise fail(exc.message, int(exc.exit_code)) from None
            previous = token
        return super().parse_args(ctx, args)


@app.command(
    cls=_CountCommand,
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
        cycled,
        [],
        key,
        detach=detach,
        as_json=as_json,
        metrics_file=metrics_file,
        job="batch",
    )


# --- reading --------------------------------------------------------------------------------


@app.command(epilog="Example: accessctl errors --since 2h --json | jq '.[].message.user_id'")
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
    limit: Annotated[int, typer.Option(metavar="N", help="Show at most this many.", min=1)] = 50,
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


@app.command(epilog="Example: accessctl status a07ff062 --json   # a unique prefix is enough")
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


@app.command(epilog="Example: accessctl config --json   # passwords hidden")
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
            "configuration", {k: f"{v}  ({sources.get(k, 'default')})" for k, v in view.items()}
        )


@app.command(epilog="Example: accessctl batches --limit 10 -o jsonl")
@handles_errors
def batches(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(metavar="N", help="Show at most this many.", min=1)] = 20,
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


@app.command(epilog="Example: accessctl retry 5769fa06 --dry-run")
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
    _file(
        settings,
        [r["user_id"] for r in failed],
        [],
        key,
        detach=detach,
        as_json=as_json,
        retry_of=source,
        # A request the provider may have filed is re-sent under its original key.
        idempotency_keys=[r["idempotency_key"] for r in failed],
        metrics_file=metrics_file,
        job="retry",
    )


@app.command(epilog="Example: accessctl prune --older-than 30d --dry-run")
@handles_errors
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", metavar="AGE", help="Age to keep, e.g. 30d, 12h, or an ISO date."
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be removed; remove nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove finished workflow records and old errors beyond the retention, in chunks,
    never touching running work. Accesses are never pruned."""
    from accessctl.prune import prune as run_prune
    from accessctl.queries import parse_since
    from accessctl.render import print_json, print_mapping
    from accessctl.runtime import database, filing_client

    cutoff = parse_since(older_than, option="--older-than")
    settings = _settings(ctx)
    with database(settings) as engine:
        client = filing_client(settings, engine)
        try:
            removed = run_prune(client, engine, cutoff, dry_run=dry_run)
        finally:
            client.destroy()
    if as_json:
        print_json(removed)
    else:
        print_mapping("would remove" if dry_run else "removed", removed)


@app.command(epilog="Example: accessctl cancel 5769fa06")
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


# --- operating ------------------------------------------------------------------------------


@app.command(epilog="Example: accessctl migrate")
@handles_errors
def migrate(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Bring the application schema and DBOS's system schema to head. Idempotent, and safe
    to run concurrently."""
    from accessctl.limits import ensure_shared_limit
    from accessctl.render import print_json
    from accessctl.runtime import filing_client, open_engine
    from accessctl.schema import migrate as run_migrations
    from accessctl.schema import migration_lock

    settings = _settings(ctx)
    engine = open_engine(settings)
    try:
        head = run_migrations(engine)
        client = filing_client(settings, engine)
        try:
            # A new database gets the configured limit; an existing one keeps its own.
            # Under the migration lock, so concurrent migrates store and record it once.
            with migration_lock(engine):
                shared = ensure_shared_limit(client, engine, settings, reason="migrate")
        finally:
            client.destroy()
    finally:
        engine.dispose()
    if settings.sources.get("rate_limit", "default") != "default" and (
        settings.rate_limit != shared.rate_limit
    ):
        import structlog

        structlog.get_logger("accessctl").warning(
            "the shared limit stays as stored; `accessctl limit set` changes it",
            stored=str(shared.rate_limit) if shared.rate_limit else "none",
            configured=str(settings.rate_limit) if settings.rate_limit else "none",
        )
    if as_json:
        print_json({"revision": head, "shared_limit": shared.as_dict()})
    else:
        typer.echo(f"schema at head (revision {head}); shared limit {shared.describe()}")


@app.command(
    epilog="Example: accessctl worker --burst --metrics-file /var/lib/node_exporter/accessctl.prom"
)
@handles_errors
def worker(
    ctx: typer.Context,
    burst: Annotated[
        bool, typer.Option("--burst", help="Exit once the queue is empty (for cron).")
    ] = False,
    metrics_file: Annotated[
        str | None,
        typer.Option(
            "--metrics-file",
            metavar="PATH",
            help="Rewrite Prometheus metrics at PATH every 15 s and when stopping "
            "(node_exporter textfile collector). [env: ACCESSCTL_METRICS_FILE]",
        ),
    ] = None,
) -> None:
    """Drain the queue until stopped: the scale-out unit. Any number of workers on any
    number of hosts share one Postgres and one global rate limit.

    Logs each batch it takes up, its progress every 10 s, its end with counts, and a
    summary when it stops. SIGINT/SIGTERM stop it (exit 130/143) after in-flight requests
    finish; queued work stays for other workers."""
    import structlog

    from accessctl.metrics import resolve_metrics_path
    from accessctl.runtime import executing_runtime
    from accessctl.worker import WorkerReport, run_worker

    settings = _settings(ctx)
    metrics_path = resolve_metrics_path(metrics_file, settings.metrics_file)
    with _signals() as (stop, reason), executing_runtime(settings) as runtime:
        structlog.get_logger("accessctl").info(
            "worker started", executor=runtime.executor_id, burst=burst
        )
        report = WorkerReport(runtime, metrics_file=metrics_path)
        try:
            run_worker(runtime, stop, burst=burst, on_poll=report.poll)
        finally:
            report.close(stopped=stop.is_set())
    if stop.is_set():
        # A signal is how a worker is meant to stop: an info line, not an error, and the
        # documented exit code (130/143).
        code = int(reason())
        structlog.get_logger("accessctl").info(
            "worker stopped; queued work stays for other workers", exit_code=code
        )
        raise typer.Exit(code)


@app.command(epilog="Example: accessctl serve --port 8000   # curl -X POST :8000/submit")
@handles_errors
def serve(
    ctx: typer.Context,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Any non-loopback address needs a bearer token "
            "(ACCESSCTL_SERVE_TOKEN or ACCESSCTL_SERVE_TOKEN_FILE)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    execute: Annotated[
        bool,
        typer.Option(
            "--execute/--no-execute",
            help="Also execute queued requests, as a worker does (default), or only file "
            "them (a pure API front for workers).",
        ),
    ] = True,
) -> None:
    """Serve the HTTP API (POST /submit, POST /batch/{count}, GET /errors, /batches, ...)
    on the same durable workflows, queue and shared limit as the CLI and the workers.
    SIGTERM: stop accepting, finish in-flight work, exit 143."""
    from accessctl.server import serve as run_server

    run_server(_settings(ctx), host=host, port=port, execute=execute)


# --- the shared limit -------------------------------------------------------------------------


@contextmanager
def _limit_client(ctx: typer.Context) -> Iterator[tuple[Settings, Any, Any]]:
    from accessctl.runtime import database, filing_client

    settings = _settings(ctx)
    with database(settings) as engine:
        client = filing_client(settings, engine)
        try:
            yield settings, engine, client
        finally:
            client.destroy()


@limit_app.command("show", epilog="Example: accessctl limit show --json")
@handles_errors
def limit_show(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the shared rate limit and concurrency, and who set them when."""
    from accessctl.limits import ensure_shared_limit
    from accessctl.render import print_json, print_mapping

    with _limit_client(ctx) as (settings, engine, client):
        shared = ensure_shared_limit(client, engine, settings, reason="first run")
    if as_json:
        print_json(shared.as_dict())
    else:
        print_mapping("shared limit", shared.as_dict())


@limit_app.command(
    "set",
    epilog="Examples: accessctl limit set 50/30 --concurrency 10 | accessctl limit set none",
)
@handles_errors
def limit_set(
    ctx: typer.Context,
    rate: Annotated[
        str | None,
        typer.Argument(
            metavar="LIMIT/SECONDS",
            help="Starts per seconds (e.g. 50/30), or none. Default: keep the current one.",
        ),
    ] = None,
    new_concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            metavar="N",
            min=1,
            max=int(BOUNDS["concurrency"].high),  # the documented bound of the setting
            help="Requests in flight at most, globally. Default: keep the current value.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Change the shared rate limit. Every running worker follows within one poll; the
    change is recorded with who made it and when (`accessctl limit show`)."""
    from accessctl.limits import ensure_shared_limit, set_shared_limit
    from accessctl.render import print_json, print_mapping
    from accessctl.settings import parse_rate_limit

    if rate is None and new_concurrency is None:
        raise UsageError("give a new limit (e.g. 50/30 or none), --concurrency N, or both")
    with _limit_client(ctx) as (settings, engine, client):
        current = ensure_shared_limit(client, engine, settings, reason="first run")
        try:
            rate_limit = (
                parse_rate_limit(rate, "limit set") if rate is not None else current.rate_limit
            )
        except AccessctlError as exc:
            raise UsageError(exc.message) from None
        before, after = set_shared_limit(
            client,
            engine,
            settings,
            rate_limit=rate_limit,
            concurrency=new_concurrency if new_concurrency is not None else current.concurrency,
        )
    result = {"before": before.as_dict() if before else None, "after": after.as_dict()}
    if as_json:
        print_json(result)
    else:
        print_mapping("shared limit", after.as_dict())


# --- users ----------------------------------------------------------------------------------


@users_app.command(
    "add", epilog="Example: accessctl users add --name 'Ada' --email ada@example.com"
)
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


@users_app.command("import", epilog="Example: accessctl users import people.csv")
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


@users_app.command("list", epilog="Example: accessctl users list --json")
@handles_errors
def users_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(metavar="N", help="Show at most this many.", min=1)] = 100,
    as_json: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """List users, newest first."""
    from accessctl.queries import list_users
    from accessctl.render import print_users

    _list(ctx, output, as_json, lambda engine: list_users(engine, limit=limit), print_users)


# --- accesses -------------------------------------------------------------------------------


@accesses_app.command("list", epilog="Example: accessctl accesses list --status requested --json")
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
    limit: Annotated[int, typer.Option(metavar="N", help="Show at most this many.", min=1)] = 100,
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


@accesses_app.command("approve", epilog="Example: accessctl accesses approve 6f1e2d3c 9b2e4d6f")
@handles_errors
def accesses_approve(ctx: typer.Context, access_ids: AccessIds) -> None:
    """Approve requested accesses (all or none)."""
    _transition(ctx, access_ids, "approved")


@accesses_app.command("reject", epilog="Example: accessctl accesses reject 6f1e2d3c")
@handles_errors
def accesses_reject(ctx: typer.Context, access_ids: AccessIds) -> None:
    """Reject requested accesses (all or none)."""
    _transition(ctx, access_ids, "rejected")


@accesses_app.command("cancel", epilog="Example: accessctl accesses cancel 6f1e2d3c")
@handles_errors
def accesses_cancel(ctx: typer.Context, access_ids: AccessIds) -> None:
    """Cancel requested or approved accesses (all or none)."""
    _transition(ctx, access_ids, "canceled")


def main() -> None:
    """The ``accessctl`` entry point.

    Exits with ``os._exit`` once the command is done and its output flushed: DBOS's
    executor threads may still be blocked in workflows this process picked up (another
    run's batch, work cut short by a signal). Their state is durable and an executor whose
    lease is gone gets its work adopted, so waiting for those threads would only hang.

    The installed script enters through ``accessctl.entry.main``, which sets the start-up
    signal handlers before this module's imports; set them here too for other callers."""
    from accessctl.entry import install_early_handlers

    install_early_handlers()
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    _save_coverage()
    os._exit(code)


def _save_coverage() -> None:
    """Under coverage.py (CI measures the processes the tests start), write this process's
    data now: ``os._exit`` skips the exit hook that would. Never imports coverage itself."""
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        current.stop()
        current.save()

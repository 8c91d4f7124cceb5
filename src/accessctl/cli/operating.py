"""Operating: ``prune``, ``migrate``, ``worker``, ``serve``, and ``limit show`` /
``limit set`` (the shared rate limit)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from accessctl.cli.common import JsonOption, _settings, command, handles_errors
from accessctl.exceptions import UsageError
from accessctl.settings import BOUNDS, Settings


@command(epilog="Example: accessctl prune --older-than 30d --dry-run")
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


# --- migrate, worker, serve ---


@command(epilog="Example: accessctl migrate")
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


@command(
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
    from accessctl.worker import work_until_stopped

    code = work_until_stopped(_settings(ctx), burst=burst, metrics_file=metrics_file)
    if code:
        raise typer.Exit(int(code))


@command(epilog="Example: accessctl serve --port 8000   # curl -X POST :8000/submit")
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


# --- limit show / set ------------------------------------------------------------------------


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


@command("show", epilog="Example: accessctl limit show --json")
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


@command(
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
        # A malformed limit is a SettingError: a usage error (exit 2), as for any setting.
        rate_limit = parse_rate_limit(rate, "limit set") if rate is not None else current.rate_limit
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

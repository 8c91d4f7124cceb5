"""The command-line interface: parse, call the core, render, exit. Nothing else lives here.

One module per command group (``filing``, ``reading``, ``operating``, ``people``) over
``common`` (options, settings, error handling); this module holds the app, its global
options and the order in which ``--help`` lists the commands.

Heavy imports (DBOS, SQLAlchemy, drivers) happen inside the commands that need them, so
``accessctl --help`` stays fast and needs no database.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from accessctl import __version__
from accessctl.cli import filing, operating, people, reading
from accessctl.cli.common import check_all_registered, register
from accessctl.clicore import AccessctlGroup, error_exit
from accessctl.exceptions import AccessctlError
from accessctl.settings import Settings, resolve_settings

__all__ = ["app", "main"]

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
accesses_app = typer.Typer(help="List accesses and move them along their lifecycle.")
limit_app = typer.Typer(
    help="Show or change the shared rate limit: one limit, stored in the database, that "
    "every run and worker follows."
)

# The order `accessctl --help` lists them in: commands first, then the groups.
register(
    app,
    filing.submit,
    filing.batch,
    reading.errors,
    reading.status,
    reading.config,
    reading.batches,
    filing.retry,
    operating.prune,
    filing.cancel,
    operating.migrate,
    operating.worker,
    operating.serve,
)
register(users_app, people.users_add, people.users_import, people.users_list)
register(
    accesses_app,
    people.accesses_list,
    people.accesses_approve,
    people.accesses_reject,
    people.accesses_cancel,
)
register(limit_app, operating.limit_show, operating.limit_set)
check_all_registered()
app.add_typer(users_app, name="users")
app.add_typer(accesses_app, name="accesses")
app.add_typer(limit_app, name="limit")


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
        raise error_exit(exc) from None
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

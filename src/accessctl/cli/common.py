"""What every command shares: option types, settings, error handling, listings, and the
declaration of a command beside its code (``cli/__init__.py`` registers them in order)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import click
import typer

from accessctl.clicore import error_exit
from accessctl.exceptions import AccessctlError, UsageError
from accessctl.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

# --- declaring commands -----------------------------------------------------------------------

_DECLARED: dict[Callable[..., Any], dict[str, Any]] = {}
_REGISTERED: set[Callable[..., Any]] = set()


def command(name: str | None = None, **options: Any) -> Callable[[F], F]:
    """Declare a command beside its code: its name, epilog and click class, as
    ``typer.Typer.command`` takes them. ``register`` adds it to a Typer app, so the order
    ``--help`` lists the commands in is written once, in ``cli/__init__.py``."""

    def declare(func: F) -> F:
        _DECLARED[func] = {"name": name, **options}
        return func

    return declare


def register(target: typer.Typer, *funcs: Callable[..., Any]) -> None:
    """Add declared commands to ``target``, in the order given."""
    for func in funcs:
        target.command(**_DECLARED[func])(func)
        _REGISTERED.add(func)


def check_all_registered() -> None:
    """A command declared but never registered would vanish from the CLI without a word."""
    missing = [func.__name__ for func in _DECLARED if func not in _REGISTERED]
    if missing:
        raise RuntimeError(f"declared but not registered in cli/__init__.py: {missing}")


# --- errors ---------------------------------------------------------------------------------


def handles_errors(func: F) -> F:
    """Map every failure to one stderr line and its documented exit code (the mapping
    itself: ``clicore.error_exit``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise  # click's own control flow and usage errors
        except (Exception, KeyboardInterrupt) as exc:
            # Whatever the text, the configured URL's passwords are scrubbed from it.
            url = None
            ctx = kwargs.get("ctx")
            if (
                not isinstance(exc, AccessctlError | KeyboardInterrupt)
                and isinstance(ctx, typer.Context)
                and ctx.obj
            ):
                with contextlib.suppress(AccessctlError):
                    url = _settings(ctx).database_url
            raise error_exit(exc, url=url) from None

    return wrapper  # type: ignore[return-value]


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj["settings"]()
    return settings


# --- options every group uses ---------------------------------------------------------------

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
LimitOption = Annotated[int, typer.Option(metavar="N", help="Show at most this many.", min=1)]


# --- listings -------------------------------------------------------------------------------


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

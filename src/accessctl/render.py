"""Turning plain data into stdout: tables for people, JSON for machines.

Tables are what operators copy IDs from, in a terminal or in cron mail (80 columns), so
they follow ``kubectl get`` rather than a spreadsheet: an ID or a timestamp is never
wrapped or cut, timestamps are compact UTC, free text is cut with an ellipsis, and when
the width does not hold every column the least useful ones are left out (the title says
so); ``-o wide`` shows every column in full, however long the lines get.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

OUTPUT_FORMATS = ("table", "wide", "json", "jsonl", "ids")
_color = True

# The gap between two columns: padding, the (blank) rule, padding.
_GAP = 3
# A free-text column is worth showing only with at least this many characters of it.
_MIN_TEXT = 12

Kind = Literal["id", "time", "short", "text"]
_TRAILING = re.compile(r"\s+((?:\x1b\[[0-9;]*m)*)$")


def set_color(enabled: bool) -> None:
    """``--no-color``; rich also honours the NO_COLOR environment variable by itself."""
    global _color
    _color = enabled


def stdout_console() -> Console:
    # Tables are data: they go to stdout, fitted to the terminal's width (80 off a
    # terminal, or $COLUMNS). Markup off: cell values are shown, never parsed.
    return Console(soft_wrap=False, highlight=False, no_color=not _color or None)


def emit(
    rows: Sequence[Mapping[str, Any]],
    output: str,
    *,
    id_field: str,
    table: Callable[..., None],
) -> None:
    """A listing in the chosen format: a table (``wide``: every column), one JSON array,
    JSON lines, or one ID a line (for shell pipelines: ``accessctl errors -o ids | ...``)."""
    if output == "json":
        print_json(list(rows))
    elif output == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()
    elif output == "ids":
        sys.stdout.write("".join(f"{row[id_field]}\n" for row in rows))
        sys.stdout.flush()
    else:
        table(rows, wide=output == "wide")


def print_json(data: Any) -> None:
    """JSON on stdout: one document, always parseable (non-ASCII kept, NUL escaped)."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def compact_time(value: Any) -> Any:
    """``2026-11-30T14:32:16.794579+00:00`` -> ``2026-11-30 14:32:16Z``: a table needs the
    second, not the microsecond, and one zone (JSON keeps the full value)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value
    parsed = parsed.astimezone(UTC) if parsed.tzinfo else parsed
    return parsed.strftime("%Y-%m-%d %H:%M:%SZ")


def _printable(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    # Control characters would break the table's lines; show them escaped.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(value: Any) -> Text:
    return Text(_printable(value), style="dim" if value is None else "")


@dataclass(frozen=True)
class Column:
    """One column of a listing. ``priority``: lower is kept longer when space is short.
    ``kind``: ``id``, ``time`` and ``short`` values are shown whole on one line; ``text``
    is cut with an ellipsis (and gets the width that is left)."""

    header: str
    kind: Kind
    priority: int
    wide_only: bool = False


def _natural(column: Column, cells: Sequence[str]) -> int:
    return max([len(column.header), *(len(c) for c in cells)])


def fit_columns(columns: Sequence[Column], cells: Sequence[Sequence[str]], width: int) -> list[int]:
    """Indexes of the columns to show in ``width`` characters: by priority, each one that
    still fits, whole (a text column needs ``_MIN_TEXT`` or its whole content)."""
    needs = []
    for i, column in enumerate(columns):
        natural = _natural(column, [row[i] for row in cells])
        needs.append(min(natural, _MIN_TEXT) if column.kind == "text" else natural)
    chosen: list[int] = []
    used = 0
    for i in sorted(range(len(columns)), key=lambda i: columns[i].priority):
        if columns[i].wide_only:
            continue
        extra = needs[i] + (_GAP if chosen else 0)
        if used + extra <= width:
            chosen.append(i)
            used += extra
    return sorted(chosen)


def render_table(
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    *,
    wide: bool = False,
    console: Console | None = None,
) -> None:
    """Print a listing on ``console`` (stdout's by default), fitted to its width."""
    console = console or stdout_console()
    cells = [[_printable(v) for v in row] for row in rows]
    if wide:
        shown = list(range(len(columns)))
        full = [_natural(c, [row[i] for row in cells]) for i, c in enumerate(columns)]
        # Every column in full: the lines may be longer than the terminal (`less -S`).
        width = max(console.width, sum(full) + _GAP * (len(columns) - 1))
    else:
        width = console.width
        shown = fit_columns(columns, cells, width)
        if len(shown) < len(columns) and title is not None:
            left_out = ", ".join(c.header for i, c in enumerate(columns) if i not in shown)
            title = f"{title} (-o wide adds {left_out})"
    table = Table(
        title=title,
        title_justify="left",
        title_style="",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="bold",
    )
    naturals = {i: _natural(columns[i], [row[i] for row in cells]) for i in shown}
    limits: dict[int, int] = {} if wide else _share_text_width(columns, shown, naturals, width)
    for i in shown:
        # An ID never shrinks below its length; text gets at most its share of what is left.
        table.add_column(
            columns[i].header,
            no_wrap=True,
            overflow="ellipsis",
            min_width=limits.get(i, naturals[i]),
            max_width=limits.get(i, naturals[i]),
        )
    for row, raw in zip(cells, rows, strict=True):
        table.add_row(*(Text(row[i], style="dim" if raw[i] is None else "") for i in shown))
    _print_trimmed(console, table, width)


def _share_text_width(
    columns: Sequence[Column], shown: Sequence[int], naturals: Mapping[int, int], width: int
) -> dict[int, int]:
    """Widths for the text columns: what the whole columns leave, shared out so that a
    short text keeps its full length and the long ones split the rest."""
    text = sorted((i for i in shown if columns[i].kind == "text"), key=lambda i: naturals[i])
    left = width - _GAP * (len(shown) - 1)
    left -= sum(naturals[i] for i in shown if columns[i].kind != "text")
    limits = {}
    for n, i in enumerate(text):
        share = max(left // (len(text) - n), 1)
        limits[i] = min(naturals[i], share)
        left -= limits[i]
    return limits


def _print_trimmed(console: Console, renderable: Any, width: int) -> None:
    # Rendered at a fixed width, then written with trailing blanks removed, so a line
    # copied from the terminal or a mail carries no padding.
    import io

    # A console of the table's width, writing like this one: `-o wide` may exceed the
    # terminal, which Console.print(width=...) would not allow.
    sized = Console(
        file=io.StringIO(),
        width=width,
        color_system=console.color_system,  # type: ignore[arg-type]
        force_terminal=console.is_terminal,
        no_color=console.no_color,
        highlight=False,
        soft_wrap=False,
    )
    sized.print(renderable)
    output = sized.file.getvalue()  # type: ignore[attr-defined]
    # With colour, the padding sits before the closing escape codes: strip it there too.
    text = "\n".join(_TRAILING.sub(r"\1", line) for line in output.split("\n"))
    console.file.write(text)
    console.file.flush()


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A simple table whose every column is free text (kept for ad-hoc listings)."""
    render_table(title, [Column(c, "text", n) for n, c in enumerate(columns)], rows)


def print_mapping(title: str, data: Mapping[str, Any], *, console: Console | None = None) -> None:
    """One record as field/value lines; values whole (they fold only past the width)."""
    console = console or stdout_console()
    table = Table(
        title=title,
        title_justify="left",
        title_style="",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="bold",
    )
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        shown = compact_time(value) if key.endswith("_at") else value
        table.add_row(key, _cell(shown))
    _print_trimmed(console, table, console.width)


def print_summary(summary: Mapping[str, Any], *, console: Console | None = None) -> None:
    print_mapping(f"batch {summary['batch_id']}", summary, console=console)


ERROR_COLUMNS = (
    Column("created", "time", 1),
    Column("class", "short", 2),
    Column("user", "id", 3),
    Column("detail", "text", 4),
    Column("batch", "id", 5),
    Column("error", "id", 6, wide_only=True),
)


def _error_detail(message: Mapping[str, Any]) -> Any:
    detail = message.get("detail")
    if message.get("input") is not None:
        # A refused input line: what was refused is the point of the row.
        where = f" (line {message['line']})" if message.get("line") is not None else ""
        return f"input {message['input']!r}{where}: {detail}"
    if message.get("http_status") is not None and str(message["http_status"]) not in str(detail):
        return f"HTTP {message['http_status']}: {detail}"
    return detail


def _refused_input(message: Mapping[str, Any]) -> Any:
    """The user column of a row without a user: the refused input, quoted so it is never
    taken for an ID, cut to an ID's width."""
    if message.get("user_id") is not None or message.get("input") is None:
        return message.get("user_id")
    text = repr(_printable(message["input"]))
    return text if len(text) <= 36 else text[:35] + "…"


def print_errors(
    errors: Sequence[Mapping[str, Any]], *, wide: bool = False, console: Console | None = None
) -> None:
    rows = []
    for item in errors:
        message = item["message"] if isinstance(item["message"], Mapping) else {}
        rows.append(
            (
                compact_time(item["created_at"]),
                message.get("error_class"),
                _refused_input(message),
                _error_detail(message),
                message.get("batch_id"),
                item["id"],
            )
        )
    render_table(
        f"{len(errors)} error(s), newest first", ERROR_COLUMNS, rows, wide=wide, console=console
    )


USER_COLUMNS = (
    Column("id", "id", 1),
    Column("email", "text", 2),
    Column("name", "text", 3),
    Column("created", "time", 4),
)


def print_users(
    users: Sequence[Mapping[str, Any]], *, wide: bool = False, console: Console | None = None
) -> None:
    render_table(
        f"{len(users)} user(s)",
        USER_COLUMNS,
        [(u["id"], u["email"], u["name"], compact_time(u["created_at"])) for u in users],
        wide=wide,
        console=console,
    )


BATCH_COLUMNS = (
    Column("batch", "id", 1),
    Column("state", "short", 2),
    Column("total", "short", 5),
    Column("recorded", "short", 4),
    Column("failed", "short", 3),
    Column("created", "time", 6),
    Column("key", "text", 7),
    Column("retry of", "id", 8),
)


def print_batches(
    batches: Sequence[Mapping[str, Any]], *, wide: bool = False, console: Console | None = None
) -> None:
    render_table(
        f"{len(batches)} batch(es), newest first",
        BATCH_COLUMNS,
        [
            (
                b["batch_id"],
                b["state"],
                b["total"],
                b["recorded"],
                b["failed"],
                compact_time(b["created_at"]),
                b["key"],
                b["retry_of"],
            )
            for b in batches
        ],
        wide=wide,
        console=console,
    )


ACCESS_COLUMNS = (
    Column("id", "id", 1),
    Column("status", "short", 2),
    Column("user", "id", 3),
    Column("created", "time", 4),
    Column("batch", "id", 5),
    Column("updated", "time", 6, wide_only=True),
)


def print_accesses(
    rows: Sequence[Mapping[str, Any]], *, wide: bool = False, console: Console | None = None
) -> None:
    render_table(
        f"{len(rows)} access(es)",
        ACCESS_COLUMNS,
        [
            (
                r["id"],
                r["status"],
                r["user_id"],
                compact_time(r["created_at"]),
                r["batch_id"],
                compact_time(r["updated_at"]),
            )
            for r in rows
        ],
        wide=wide,
        console=console,
    )


RETRY_COLUMNS = (
    Column("user", "id", 1),
    Column("class", "short", 2),
    Column("detail", "text", 3),
    Column("key", "short", 4, wide_only=True),
    Column("error", "id", 5, wide_only=True),
)


def print_retry_plan(
    rows: Sequence[Mapping[str, Any]], *, wide: bool = False, console: Console | None = None
) -> None:
    """``retry --dry-run``: who would be filed again, and why their request failed."""
    render_table(
        f"{len(rows)} request(s) would be retried",
        RETRY_COLUMNS,
        [
            (
                r["user_id"],
                r["error_class"],
                r.get("detail"),
                "original" if r.get("idempotency_key") else "new",
                r["error_id"],
            )
            for r in rows
        ],
        wide=wide,
        console=console,
    )

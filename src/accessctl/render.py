"""Turning plain data into stdout: rich tables for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

OUTPUT_FORMATS = ("table", "json", "jsonl", "ids")
_color = True


def set_color(enabled: bool) -> None:
    """``--no-color``; rich also honours the NO_COLOR environment variable by itself."""
    global _color
    _color = enabled


def stdout_console() -> Console:
    # Tables are data: they go to stdout, fitted to the terminal's width. Markup off:
    # cell values are shown, never parsed.
    return Console(soft_wrap=False, highlight=False, no_color=not _color or None)


def emit(
    rows: Sequence[Mapping[str, Any]],
    output: str,
    *,
    id_field: str,
    table: Callable[[Sequence[Mapping[str, Any]]], None],
) -> None:
    """A listing in the chosen format: a table, one JSON array, JSON lines, or one ID a
    line (for shell pipelines: ``accessctl errors -o ids | ...``)."""
    if output == "json":
        print_json(list(rows))
    elif output == "jsonl":
        import sys

        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()
    elif output == "ids":
        import sys

        sys.stdout.write("".join(f"{row[id_field]}\n" for row in rows))
        sys.stdout.flush()
    else:
        table(rows)


def print_json(data: Any) -> None:
    """JSON on stdout: one document, always parseable (non-ASCII kept, NUL escaped)."""
    import sys

    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> Text:
    if value is None:
        return Text("-", style="dim")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    # Control characters would break the table's lines; show them escaped.
    return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, show_lines=False, expand=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    stdout_console().print(table)


def print_mapping(title: str, data: Mapping[str, Any]) -> None:
    print_table(title, ["field", "value"], [(k, v) for k, v in data.items()])


def print_summary(summary: Mapping[str, Any]) -> None:
    print_mapping(f"batch {summary['batch_id']}", summary)


def print_errors(errors: Sequence[Mapping[str, Any]]) -> None:
    rows = []
    for item in errors:
        message = item["message"] if isinstance(item["message"], Mapping) else {}
        rows.append(
            (
                item["created_at"],
                message.get("batch_id"),
                message.get("user_id"),
                message.get("error_class"),
                message.get("detail"),
            )
        )
    print_table(
        f"{len(errors)} error(s), newest first",
        ["created", "batch", "user", "class", "detail"],
        rows,
    )


def print_users(users: Sequence[Mapping[str, Any]]) -> None:
    print_table(
        f"{len(users)} user(s)",
        ["id", "name", "email", "created"],
        [(u["id"], u["name"], u["email"], u["created_at"]) for u in users],
    )


def print_batches(batches: Sequence[Mapping[str, Any]]) -> None:
    print_table(
        f"{len(batches)} batch(es), newest first",
        ["batch", "key", "created", "total", "recorded", "failed", "state", "retry of"],
        [
            (
                b["batch_id"],
                b["key"],
                b["created_at"],
                b["total"],
                b["recorded"],
                b["failed"],
                b["state"],
                b["retry_of"],
            )
            for b in batches
        ],
    )


def print_accesses(rows: Sequence[Mapping[str, Any]]) -> None:
    print_table(
        f"{len(rows)} access(es)",
        ["id", "user", "status", "batch", "created"],
        [(r["id"], r["user_id"], r["status"], r["batch_id"], r["created_at"]) for r in rows],
    )

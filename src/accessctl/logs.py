"""Logging: structlog on stderr, JSON lines off a terminal, readable lines on one.

DBOS's own records (the ``dbos`` stdlib logger) go through the same formatter, so an
operator reads one stream. Configured at run time by the CLI callback, never at import.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from accessctl.settings import LogFormat

_HANDLER_NAME = "accessctl-stderr"


_TRACEBACK = "Traceback (most recent call last):"


def _dbos_without_tracebacks(record: logging.LogRecord) -> bool:
    """Keep tracebacks from DBOS's records off the operator's stream: DBOS 3.4 writes one
    into a warning's text when its schedule poller loses the database (a restart), and
    attaches one to some errors. The record keeps its first line and the exception's."""
    if not record.name.startswith("dbos"):
        return True
    message = record.getMessage()
    if _TRACEBACK in message:
        head, _, trace = message.partition(_TRACEBACK)
        lines = trace.strip().splitlines()
        record.msg = " ".join(p for p in (head.strip(), lines[-1] if lines else "") if p)
        record.args = None
    if record.exc_info:
        exc = record.exc_info[1]
        if exc is not None:
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {str(exc)[:200]})"
            record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def configure_logging(
    fmt: LogFormat | None, *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging (DBOS included) to one stderr handler."""
    stream = sys.stderr if stream is None else stream
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.name = _HANDLER_NAME
    handler.addFilter(_dbos_without_tracebacks)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # DBOS adds its own console handler unless its logger already has one: give it ours.
    dbos_logger = logging.getLogger("dbos")
    for old in list(dbos_logger.handlers):
        dbos_logger.removeHandler(old)
    dbos_logger.addHandler(handler)
    dbos_logger.propagate = False
    # DBOS is chatty at INFO (every migration step, every queue); keep its warnings.
    dbos_logger.setLevel(max(level, logging.WARNING))
    for noisy in ("alembic", "sqlalchemy", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))

"""Prometheus metrics for cron runs and workers, as node_exporter's textfile collector reads
them: one ``*.prom`` file per job, rewritten whole and atomically (``write_to_textfile``
writes a temporary file and renames it), so the collector never reads half a file.

Cron jobs are alerted on through these, not by reading logs, for example::

    time() - accessctl_last_success_timestamp_seconds > 26 * 3600

A run rewrites the whole file, so the last success is carried over from the previous file
when this run did not succeed: otherwise a failing job would erase the very value the
alert watches. A job that never succeeded reports 0, so the alert fires for it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from accessctl.exceptions import AccessctlError, ConfigError

log = structlog.get_logger(__name__)

LAST_SUCCESS = "accessctl_last_success_timestamp_seconds"


def previous_success(path: Path, job: str) -> float:
    """The last success recorded in ``path`` for ``job``; 0 when there is none (or the
    file cannot be read: it is rewritten whole anyway)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return 0.0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAST_SUCCESS and sample.labels.get("job") == job:
                    return float(sample.value)
    except ValueError:  # not the text format: start afresh
        return 0.0
    return 0.0


def error_classes(engine: sa.Engine, batch_ids: list[str]) -> dict[str, int]:
    """Failed requests of the given batches, by error class."""
    import uuid

    from accessctl.models import Error

    if not batch_ids:
        return {}
    error_class = Error.message["error_class"].as_string()
    query = (
        sa.select(error_class, sa.func.count())
        .where(Error.batch_id.in_([uuid.UUID(b) for b in batch_ids]))
        .group_by(error_class)
    )
    with engine.connect() as conn:
        return {str(name or "unknown"): int(count) for name, count in conn.execute(query)}


def queue_depth(engine: sa.Engine) -> int:
    """Requests waiting on the rate-limited queue, on every host."""
    from accessctl.batch_state import WORKFLOW_WAITING
    from accessctl.db import dbos_table
    from accessctl.workflows import QUEUE_NAME

    # Waiting: enqueued, or delayed (a provider retry waiting out its backoff).
    stmt = sa.text(
        f"SELECT count(*) FROM {dbos_table(engine)} WHERE status IN :waiting AND queue_name = :q"
    ).bindparams(sa.bindparam("waiting", expanding=True))
    with engine.connect() as conn:
        return int(
            conn.execute(stmt, {"q": QUEUE_NAME, "waiting": sorted(WORKFLOW_WAITING)}).scalar() or 0
        )


def write_metrics(
    path: Path,
    *,
    job: str,
    success_at: float | None,
    exit_code: int | None,
    recorded: int,
    failed_by_class: Mapping[str, int],
    duration: float | None,
    queue: int | None,
    extra: Mapping[str, tuple[str, float]] | None = None,
    now: float | None = None,
) -> None:
    """Write one job's metrics to ``path`` atomically. ``success_at``: when the job last
    succeeded, None to keep the file's previous value. ``extra``: more gauges, name ->
    (help, value). Failing to write is logged, never fatal: the work itself is done."""
    now = time.time() if now is None else now
    registry = CollectorRegistry()

    def gauge(name: str, documentation: str, labels: tuple[str, ...] = ("job",)) -> Gauge:
        return Gauge(name, documentation, labels, registry=registry)

    gauge("accessctl_last_run_timestamp_seconds", "When the run last wrote these.").labels(job).set(
        now
    )
    gauge(LAST_SUCCESS, "When the job last ended with every request recorded.").labels(job).set(
        success_at if success_at is not None else previous_success(path, job)
    )
    if exit_code is not None:
        gauge("accessctl_last_run_exit_code", "The run's exit code.").labels(job).set(exit_code)
    requests = gauge(
        "accessctl_requests", "Requests of the run's batches, by outcome.", ("job", "outcome")
    )
    requests.labels(job, "recorded").set(recorded)
    requests.labels(job, "failed").set(sum(failed_by_class.values()))
    by_class = gauge(
        "accessctl_requests_failed",
        "Failed requests of the run's batches, by error class.",
        ("job", "error_class"),
    )
    for name, count in sorted(failed_by_class.items()):
        by_class.labels(job, name).set(count)
    if duration is not None:
        gauge("accessctl_batch_duration_seconds", "How long the run followed its batch.").labels(
            job
        ).set(duration)
    if queue is not None:
        gauge("accessctl_queue_depth", "Requests waiting on the queue, all hosts.").labels(job).set(
            queue
        )
    for name, (documentation, value) in (extra or {}).items():
        gauge(name, documentation).labels(job).set(value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), registry)
    except OSError as exc:
        log.warning("cannot write the metrics file", path=str(path), reason=exc.strerror)


def resolve_metrics_path(flag: str | None, setting: Path | None) -> Path | None:
    """``--metrics-file`` wins over ACCESSCTL_METRICS_FILE; a blank flag is a mistake."""
    if flag is not None:
        if not flag.strip():
            raise ConfigError("--metrics-file must not be empty")
        return Path(flag).expanduser()
    return setting


def run_metrics(
    path: Path,
    engine: sa.Engine,
    *,
    job: str,
    summary: Mapping[str, Any] | None,
    exit_code: int,
    duration: float,
) -> None:
    """The end of an attached ``submit``/``batch``/``retry``: its batch's outcome."""
    batch_ids = [str(summary["batch_id"])] if summary else []
    try:
        classes = error_classes(engine, batch_ids)
        depth: int | None = queue_depth(engine)
    except sa.exc.SQLAlchemyError as exc:  # the run's result matters more than its metrics
        log.warning("metrics: cannot read the database", error=type(exc).__name__)
        classes, depth = {}, None
    if summary and not classes and summary.get("failed"):
        classes = {"unknown": int(summary["failed"])}
    write_metrics(
        path,
        job=job,
        success_at=time.time() if exit_code == 0 else None,
        exit_code=exit_code,
        recorded=int(summary["recorded"]) if summary else 0,
        failed_by_class=classes,
        duration=duration,
        queue=depth,
    )


@contextmanager
def recording_run(
    path: Path | None, engine: sa.Engine, *, job: str
) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """Around an attached run: hands out ``record(summary)``; when the run ends, writes
    its metrics to ``path`` (if any), with the exit code its summary or its error gives."""
    started = time.monotonic()
    recorded: list[Mapping[str, Any]] = []
    try:
        yield recorded.append
    except AccessctlError as exc:  # interrupted, refused, database gone: alerts need it
        if path is not None:
            run_metrics(
                path,
                engine,
                job=job,
                summary=None,
                exit_code=int(exc.exit_code),
                duration=time.monotonic() - started,
            )
        raise
    if path is not None and recorded:
        summary = recorded[-1]
        from accessctl.batch_state import exit_code_for

        run_metrics(
            path,
            engine,
            job=job,
            summary=summary,
            # The same rule as the exit code of an attached run.
            exit_code=int(exit_code_for(summary)),
            duration=time.monotonic() - started,
        )

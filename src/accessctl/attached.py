"""Filing a batch for a command (``submit``, ``batch``, ``retry``): detached or attached,
and the exit code its outcome calls for. The CLI parses the request and renders the
outcome; everything between lives here.

- Detached: file the batch durably and return its ID; a worker or the next run executes it.
- Attached: file it (or attach to the batch its key names), execute and follow it to the
  end with progress on stderr, under the graceful signal policy (signals.py), recording
  Prometheus metrics if asked; exit 1 unless every request was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from accessctl.exceptions import ExitCode

if TYPE_CHECKING:
    from accessctl.batches import BatchRequest
    from accessctl.settings import Settings

log = structlog.get_logger("accessctl")


@dataclass(frozen=True)
class FilingOutcome:
    """What a filing command reports, and how it exits."""

    report: dict[str, Any]  # detached: batch_id, key, total; attached: the batch's summary
    detached: bool
    exit_code: ExitCode


def file_request(
    settings: Settings,
    request: BatchRequest,
    *,
    detach: bool,
    metrics_file: str | None = None,
    job: str = "submit",
) -> FilingOutcome:
    """File ``request`` detached or attached (see the module's docstring)."""
    if detach:
        return _file_detached(settings, request)
    return _file_attached(settings, request, metrics_file=metrics_file, job=job)


def _file_detached(settings: Settings, request: BatchRequest) -> FilingOutcome:
    from accessctl.batches import enqueue_detached
    from accessctl.runtime import database

    with database(settings) as engine:
        # The same rule as an executing run: a limit given on purpose must match.
        batch_id = enqueue_detached(settings, engine, request)
    report = {"batch_id": batch_id, "key": request.key, "total": request.total}
    return FilingOutcome(report=report, detached=True, exit_code=ExitCode.OK)


def _file_attached(
    settings: Settings, request: BatchRequest, *, metrics_file: str | None, job: str
) -> FilingOutcome:
    from accessctl.batch_state import exit_code_for
    from accessctl.batches import run_attached
    from accessctl.metrics import recording_run, resolve_metrics_path
    from accessctl.progress import ProgressReporter
    from accessctl.runtime import executing_runtime
    from accessctl.signals import graceful_signals

    metrics_path = resolve_metrics_path(metrics_file, settings.metrics_file)
    structlog.contextvars.bind_contextvars(batch_id=request.batch_id)
    try:
        with (
            graceful_signals() as (stop, reason),
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
    log.info("batch finished", **summary)
    return FilingOutcome(report=dict(summary), detached=False, exit_code=exit_code_for(summary))

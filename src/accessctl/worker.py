"""``accessctl worker``: drain the queues until stopped, or until empty with ``--burst``.

A worker says what it does: a log line when it takes up a batch, its progress at most
every ``PROGRESS_EVERY`` seconds, one when the batch ends (with its counts), and a summary
when the worker stops. With a metrics file it also rewrites Prometheus metrics every
``METRICS_EVERY`` seconds and when it stops (metrics.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from dbos import WorkflowStatusString

from accessctl.batch_state import WORKFLOW_WAITING
from accessctl.db import dbos_table
from accessctl.exceptions import ExitCode
from accessctl.runtime import Runtime
from accessctl.settings import Settings
from accessctl.workflows import BATCH_QUEUE_NAME, QUEUE_NAME, WORKFLOW_VERSION

log = structlog.get_logger("accessctl.worker")

PROGRESS_EVERY = 10.0
METRICS_EVERY = 15.0
# How often the batches being worked are counted (cheap reads, one batch each).
CHECK_EVERY = 2.0
_ENDED = ("done", "cancelled", "failed")


def outstanding_work(engine: sa.Engine) -> int:
    """Queued work anyone may take (delayed retries included: a burst worker must not exit
    with a provider retry pending), plus work any executor is running: another's may be a
    dead process's, which this worker adopts only after the adoption grace
    (docs/operations.md, "Executors and leases"), so a burst worker must not leave first."""
    table = dbos_table(engine)
    stmt = sa.text(
        f"SELECT count(*) FROM {table} WHERE application_version = :v AND ("
        "(status IN :waiting AND queue_name IN (:q1, :q2)) OR status = :pending)"
    ).bindparams(sa.bindparam("waiting", expanding=True))
    with engine.connect() as conn:
        return int(
            conn.execute(
                stmt,
                {
                    "v": WORKFLOW_VERSION,
                    "q1": QUEUE_NAME,
                    "q2": BATCH_QUEUE_NAME,
                    "waiting": sorted(WORKFLOW_WAITING),
                    "pending": WorkflowStatusString.PENDING.value,
                },
            ).scalar()
            or 0
        )


def batches_touched(engine: sa.Engine, executor_id: str, since_ms: int) -> set[str]:
    """Batches whose requests this executor ran or finished since ``since_ms``. Request
    workflow IDs are ``req-<batch id>-<index>``; their rows carry the executor and
    ``updated_at``, so a request that started and ended between two polls is seen too."""
    stmt = sa.text(
        f"SELECT DISTINCT substr(workflow_uuid, 5, 36) FROM {dbos_table(engine)} "
        "WHERE executor_id = :me AND updated_at >= :since AND workflow_uuid LIKE 'req-%'"
    )
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(stmt, {"me": executor_id, "since": since_ms})}


class WorkerReport:
    """Follows the batches a worker works on, for its log lines and metrics."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        metrics_file: Path | None = None,
        progress_every: float = PROGRESS_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = runtime.engine
        self.executor_id = runtime.executor_id
        self.metrics_file = metrics_file
        self.progress_every = progress_every
        self.clock = clock
        self.started = clock()
        self.started_ms = int(time.time() * 1000)
        self.seen_since_ms = self.started_ms
        self.tracked: dict[str, dict[str, Any]] = {}
        self.last_progress: dict[str, float] = {}
        self.finished: list[dict[str, Any]] = []
        self.last_check = -CHECK_EVERY
        self.seen_activities = -1
        self.last_metrics = self.started
        self.last_success = 0.0

    def _status(self, batch_id: str) -> dict[str, Any] | None:
        from accessctl.exceptions import UsageError
        from accessctl.queries import batch_status

        try:
            return batch_status(self.engine, batch_id)
        except UsageError:  # not one of ours (a stray workflow ID): nothing to report
            return None

    def poll(self) -> None:
        from accessctl.pacing import pacer

        now = self.clock()
        if now - self.last_check < CHECK_EVERY:
            return
        activities = pacer().activities
        if not self.tracked and activities == self.seen_activities:
            # Nothing claimed or waiting since the last look, and no batch in hand: the
            # database has nothing new for this report (an idle worker reads nothing).
            self._maybe_write_metrics(now)
            return
        self.seen_activities = activities
        self.last_check = now
        poll_ms = int(time.time() * 1000)
        # A little overlap: a row updated while we read is seen on the next poll.
        for batch_id in batches_touched(self.engine, self.executor_id, self.seen_since_ms):
            if batch_id not in self.tracked and batch_id not in self._finished_ids():
                status = self._status(batch_id)
                if status is None:
                    continue
                self.tracked[batch_id] = status
                self.last_progress[batch_id] = now
                log.info("batch started", **_counts(status))
        self.seen_since_ms = poll_ms - 1000
        for batch_id in list(self.tracked):
            status = self._status(batch_id)
            if status is None:
                continue
            self.tracked[batch_id] = status
            if status["state"] in _ENDED:
                self._finish(batch_id, status)
            elif now - self.last_progress[batch_id] >= self.progress_every:
                self.last_progress[batch_id] = now
                log.info("batch progress", **_counts(status))
        self._maybe_write_metrics(now)

    def _maybe_write_metrics(self, now: float) -> None:
        if self.metrics_file is not None and now - self.last_metrics >= METRICS_EVERY:
            self.last_metrics = now
            self.write_metrics(running=True)

    def _finished_ids(self) -> set[str]:
        return {f["batch_id"] for f in self.finished}

    def _finish(self, batch_id: str, status: dict[str, Any]) -> None:
        del self.tracked[batch_id]
        self.finished.append(status)
        if not status["failed"] and status["state"] == "done":
            self.last_success = time.time()
        log.info("batch finished", **_counts(status))

    def totals(self) -> dict[str, Any]:
        return {
            "batches_finished": len(self.finished),
            "batches_unfinished": len(self.tracked),
            "recorded": sum(int(f["recorded"]) for f in self.finished),
            "failed": sum(int(f["failed"]) for f in self.finished),
            "seconds": round(self.clock() - self.started, 1),
        }

    def close(self, *, stopped: bool) -> dict[str, Any]:
        """Last look at the batches in hand, then the summary line (and metrics)."""
        self.last_check = -CHECK_EVERY
        self.seen_activities = -1
        try:
            self.poll()
        except sa.exc.SQLAlchemyError as exc:  # stopping anyway: say so, keep the summary
            log.warning("worker: last look at its batches failed", error=type(exc).__name__)
        totals = self.totals()
        log.info("worker summary", stopped_by="signal" if stopped else "empty queue", **totals)
        if self.metrics_file is not None:
            self.write_metrics(running=False)
        return totals

    def write_metrics(self, *, running: bool) -> None:
        from accessctl.metrics import error_classes, queue_depth, write_metrics

        assert self.metrics_file is not None
        totals = self.totals()
        try:
            classes = error_classes(self.engine, [f["batch_id"] for f in self.finished])
            depth: int | None = queue_depth(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: cannot read the database", error=type(exc).__name__)
            classes, depth = {}, None
        write_metrics(
            self.metrics_file,
            job="worker",
            # A batch it saw end with no failure is a worker's success.
            success_at=self.last_success or None,
            exit_code=None,
            recorded=totals["recorded"],
            failed_by_class=classes,
            duration=None,
            queue=depth,
            extra={
                "accessctl_worker_running": ("1 while the worker runs.", 1.0 if running else 0.0),
                "accessctl_worker_batches_finished": (
                    "Batches this worker saw to their end.",
                    float(totals["batches_finished"]),
                ),
            },
        )


def _counts(status: dict[str, Any]) -> dict[str, Any]:
    return {
        k: status[k]
        for k in ("batch_id", "key", "state", "total", "done", "recorded", "failed")
        if k in status
    }


def run_worker(
    runtime: Runtime,
    stop: threading.Event,
    *,
    burst: bool,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Block while DBOS's queue threads execute work; return on ``stop`` or, in burst
    mode, once nothing is queued or running anywhere (checked twice, to ride over the gap
    between a request queuing its retry and that retry's dequeue)."""
    from accessctl.workflows import is_transient

    interval = max(runtime.settings.poll_interval * 5, 0.5)
    idle_checks = 0
    while not stop.wait(interval):
        try:
            if on_poll is not None:
                on_poll()
            if not burst:
                continue
            idle_checks = idle_checks + 1 if outstanding_work(runtime.engine) == 0 else 0
        except Exception as exc:
            # A restarting database or a severed connection: the worker rides it out
            # (its requests retry, its lease fences it) and looks again next turn.
            if not is_transient(exc):
                raise
            log.warning("worker: cannot read the database; trying again", error=type(exc).__name__)
            idle_checks = 0
            continue
        if idle_checks >= 2:
            return


def work_until_stopped(settings: Settings, *, burst: bool, metrics_file: str | None) -> ExitCode:
    """``accessctl worker``: launch an executing runtime, drain the queue until a signal
    (or, with ``burst``, until nothing is left), report as it goes, and return the exit
    code: 0 when the queue ran dry, 130/143 when a signal stopped it. A signal is how a
    worker is meant to stop: an info line, not an error; queued work stays for others."""
    from accessctl.metrics import resolve_metrics_path
    from accessctl.runtime import executing_runtime
    from accessctl.signals import graceful_signals

    metrics_path = resolve_metrics_path(metrics_file, settings.metrics_file)
    with graceful_signals() as (stop, reason), executing_runtime(settings) as runtime:
        structlog.get_logger("accessctl").info(
            "worker started", executor=runtime.executor_id, burst=burst
        )
        report = WorkerReport(runtime, metrics_file=metrics_path)
        try:
            run_worker(runtime, stop, burst=burst, on_poll=report.poll)
        finally:
            report.close(stopped=stop.is_set())
    if not stop.is_set():
        return ExitCode.OK
    code = reason()
    structlog.get_logger("accessctl").info(
        "worker stopped; queued work stays for other workers", exit_code=int(code)
    )
    return code

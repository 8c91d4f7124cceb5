"""``accessctl worker``: drain the queues until stopped, or until empty with ``--burst``."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from dbos import WorkflowStatusString

from accessctl.batch_state import WORKFLOW_WAITING
from accessctl.db import dbos_table
from accessctl.runtime import Runtime
from accessctl.workflows import BATCH_QUEUE_NAME, QUEUE_NAME, WORKFLOW_VERSION


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


def run_worker(runtime: Runtime, stop: threading.Event, *, burst: bool) -> None:
    """Block while DBOS's queue threads execute work; return on ``stop`` or, in burst
    mode, once nothing is queued or running anywhere (checked twice, to ride over the gap
    between a request queuing its retry and that retry's dequeue)."""
    interval = max(runtime.settings.poll_interval * 5, 0.5)
    idle_checks = 0
    while not stop.wait(interval):
        if not burst:
            continue
        idle_checks = idle_checks + 1 if outstanding_work(runtime.engine) == 0 else 0
        if idle_checks >= 2:
            return

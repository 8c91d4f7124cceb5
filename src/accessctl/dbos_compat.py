"""Every place accessctl relies on DBOS beyond its public API, in one module.

accessctl's guarantees (one global limit, exactly-once rows, atomic filing, no stranded
work) rest on DBOS. Where DBOS 3.4's public API does the job, the rest of the code uses it
(``DBOSClient.list_workflows``/``cancel_workflows``/``delete_workflows``/``register_queue``,
``enqueue_in_transaction``, ``WorkflowStatusString``, ``dbos.error``). What it cannot do is
here, each hook with why, the DBOS version it was proven on, and the test that proves it
still applies. An executing process refuses to start on another DBOS version
(``check_dbos_version``, exit 3) unless the operator names that version in
``ACCESSCTL_ALLOW_DBOS_VERSION`` on purpose, after running the contract tests.

=====================  ==========================================  =============================
hook                   why no public API serves                    proven by (tests/)
=====================  ==========================================  =============================
SQLite clock           DBOS stamps queue starts with SQLite's      test_dbos_contract.py::
(``install_sqlite_     ``strftime('%s','now')`` (whole seconds on  test_dbos_clock_expression_
clock``)               Python < 3.12: its limiter over-admits) or  is_exact_on_our_engine
                       ``unixepoch('subsec')`` (3.12+; NULL before (CI: 3.11, 3.12, 3.13);
                       SQLite 3.42, so DBOS cannot even launch).   test_sqlite_clock.py
                       We register both with ms precision on our
                       engine; DBOS has no clock setting.
claim transaction      pysqlite begins a transaction only at the   test_dbos_contract.py::
(``serialize_sqlite_   first write, so DBOS's limiter count runs   test_claims_go_through_the_
claims``)              unlocked and two processes can admit the    serialized_begin;
                       last slot. ``SystemDatabase._begin`` is     test_faults.py (3 processes,
                       used by exactly that claim; we make it      one limit)
                       ``BEGIN IMMEDIATE``.
bulk filing            ``enqueue_in_transaction`` writes one       test_dbos_contract.py::
(``bulk_enqueue``)     workflow per call (3 statements); a batch   test_bulk_rows_equal_dbos_
                       of 100,000 then takes minutes. Above        enqueued_rows;
                       ``filing.BULK_THRESHOLD`` we build DBOS's   BENCHMARKS.md (filing)
                       own status rows (``_build_enqueue_status``)
                       and insert them as one executemany.
shutdown drain         ``DBOS.destroy(workflow_completion_         test_faults.py (SIGTERM:
(``stop_dequeuing``,   timeout_sec)`` sleeps at least 1 s and      in-flight requests finish,
``requests_running``)  waits for every workflow, batch followers   exit 143)
                       included, which wait on requests nobody
                       runs any more: every stop would cost the
                       whole grace. We stop the queue threads and
                       wait for requests only.
adoption               Requeuing a dead executor's PENDING work    test_faults.py (kill -9
(``requeue_for_        through its queue is what DBOS's recovery   campaigns: each workflow
adoption``)            does at launch, for its own executor ID     runs once)
                       only; there is no public call for another
                       executor's work.
dequeue gate           A process whose lease is lost must start    test_lease.py::
(``gate_dequeue``)     nothing until it is back; DBOS cannot       test_dequeue_gate_*;
                       pause a launched process's dequeuing        test_faults.py::test_database_
                       (``listen_queues`` is before launch only;   restart_runs_every_request_
                       stopping queue threads is for good).        once
execution token        Before a provider call, a request checks    test_lease.py::test_a_
(``execution_token``)  it still owns its workflow (it may have     replaced_execution_does_not_
                       been adopted while its lease was lost);     call; every provider test
                       DBOS keeps the token in a context variable
                       with no public accessor.
=====================  ==========================================  =============================

Importing this module imports nothing of DBOS: the CLI's ``--help`` stays light.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from accessctl.exceptions import ConfigError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dbos import DBOSClient

# The DBOS release every hook below was read against and the contract tests ran on.
PROVEN_DBOS_VERSION = "3.4.0"
ALLOW_VARIABLE = "ACCESSCTL_ALLOW_DBOS_VERSION"


def installed_dbos_version() -> str:
    """DBOS's version (``dbos.__version__`` is None in 3.4)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dbos")
    except PackageNotFoundError:
        return "unknown"


def check_dbos_version(env: Mapping[str, str] | None = None) -> None:
    """Refuse (exit 3) to execute or file on a DBOS version the hooks were not proven on,
    unless the operator names the installed version in ACCESSCTL_ALLOW_DBOS_VERSION."""
    installed = installed_dbos_version()
    if installed == PROVEN_DBOS_VERSION:
        return
    allowed = (os.environ if env is None else env).get(ALLOW_VARIABLE, "").strip()
    if allowed == installed:
        return
    raise ConfigError(
        f"DBOS {installed} is installed, but accessctl's DBOS hooks were proven on "
        f"{PROVEN_DBOS_VERSION}; install dbos=={PROVEN_DBOS_VERSION}, or run the contract "
        f"tests on {installed} and set {ALLOW_VARIABLE}={installed} (README, "
        '"Upgrading dependencies")'
    )


# --- SQLite clock ---------------------------------------------------------------------------

_pristine_lock = threading.Lock()
_pristine: sqlite3.Connection | None = None


def _builtin(sql: str, *args: Any) -> Any:
    """Evaluate a built-in SQLite function on a connection that has no overrides."""
    global _pristine
    with _pristine_lock:
        if _pristine is None:
            _pristine = sqlite3.connect(":memory:", check_same_thread=False)
        return _pristine.execute(sql, args).fetchone()[0]


def _strftime(fmt: Any, value: Any) -> Any:
    # DBOS's millisecond clock on Python < 3.12 is strftime('%s','now') * 1000.
    if fmt == "%s" and value == "now":
        return f"{time.time():.3f}"
    return _builtin("SELECT strftime(?, ?)", fmt, value)


def _unixepoch(value: Any) -> Any:
    # DBOS's millisecond clock on Python >= 3.12 is unixepoch('subsec') * 1000.
    if value in ("subsec", "subsecond"):
        return round(time.time(), 3)
    return _builtin("SELECT unixepoch(?)", value)


def install_sqlite_clock(dbapi_conn: Any) -> None:
    """Give this SQLite connection DBOS's clock functions with millisecond precision
    (SQLite lets an application-defined function override a built-in of the same name
    and arity); every other use of them keeps the built-in meaning."""
    dbapi_conn.create_function("strftime", 2, _strftime)
    dbapi_conn.create_function("unixepoch", 1, _unixepoch)


# --- the claim transaction ------------------------------------------------------------------

# Claims that went through the serialized begin in this process (the contract test reads it).
serialized_claims = 0


def serialize_sqlite_claims() -> None:
    """Make DBOS's queue-claim transaction ``BEGIN IMMEDIATE`` on SQLite, so the limiter's
    count and the claim hold the write lock together across processes."""
    from dbos._sys_db_sqlite import SQLiteSystemDatabase

    if not callable(getattr(SQLiteSystemDatabase, "_begin", None)):
        # Setting the attribute would "work" and change nothing: refuse instead.
        raise ConfigError(
            f"DBOS {installed_dbos_version()} has no SystemDatabase._begin; accessctl "
            "cannot serialize SQLite queue claims on it (see dbos_compat.py)"
        )

    @contextlib.contextmanager
    def _begin_immediate(self: Any, isolation: str | None) -> Iterator[Any]:
        global serialized_claims
        serialized_claims += 1
        with self.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    SQLiteSystemDatabase._begin = _begin_immediate  # type: ignore[method-assign]


# --- shutdown -------------------------------------------------------------------------------


def stop_dequeuing() -> None:
    """Stop this process's DBOS queue threads: nothing new is dequeued from here on."""
    from dbos._dbos import _get_dbos_instance

    for stop in _get_dbos_instance().background_thread_stop_events:
        stop.set()


def requests_running(queue_name: str) -> int:
    """Workflows of ``queue_name`` this process is executing now."""
    from dbos._dbos import _get_dbos_instance

    return int(_get_dbos_instance()._active_workflows_set.count_for_queue(queue_name))


# --- bulk filing ----------------------------------------------------------------------------


def build_enqueue_status(
    client: DBOSClient, queue: str, workflow: str, workflow_id: str, app_version: str, *args: Any
) -> Any:
    """The ``workflow_status`` row DBOS's own enqueue would write (inputs serialized)."""
    _, status = client._build_enqueue_status(
        {
            "queue_name": queue,
            "workflow_name": workflow,
            "workflow_id": workflow_id,
            "app_version": app_version,
        },
        *args,
    )
    return status


def bulk_enqueue(
    client: DBOSClient, conn: sa.Connection, statuses: list[Any], created_ms: int
) -> None:
    """Write ENQUEUED workflow rows (status and inputs) the way DBOS 3.4's bulk enqueue
    (``SystemDatabase.init_workflows``) does, but in our transaction and as one compiled
    statement executed for many rows: DBOS's multi-row VALUES statement is compiled anew
    for every 500 rows, which made it 10-40x slower (BENCHMARKS.md). Partition keys,
    deduplication and sharding are not used here, which is what lets the row be this
    simple. Every row carries the same ``created_ms``: the batch was filed at one moment."""
    import sqlalchemy as sa

    # DBOS's tables name a placeholder schema, translated per connection (as its own
    # enqueue_in_transaction does to a caller's connection).
    client._sys_db._apply_caller_schema(conn)
    tables = client._sys_db.tables
    conn.execute(
        sa.insert(tables.workflow_status),
        [
            {
                "workflow_uuid": s["workflow_uuid"],
                "status": s["status"],
                "name": s["name"],
                "class_name": s["class_name"],
                "config_name": s["config_name"],
                "executor_id": s["executor_id"],
                "application_version": s["app_version"],
                "application_id": s["app_id"],
                "authenticated_user": s["authenticated_user"],
                "authenticated_roles": s["authenticated_roles"],
                "assumed_role": s["assumed_role"],
                "queue_name": s["queue_name"],
                "recovery_attempts": 0,
                "workflow_timeout_ms": s["workflow_timeout_ms"],
                "workflow_deadline_epoch_ms": s["workflow_deadline_epoch_ms"],
                "deduplication_id": None,
                "priority": s["priority"],
                "serialization": s["serialization"],
                "queue_partition_key": None,
                "parent_workflow_id": None,
                "creator_xid": None,
                "delay_until_epoch_ms": s["delay_until_epoch_ms"],
                "attributes": s["attributes"],
                "schedule_name": None,
                "application_name": s["application_name"],
                "created_at": created_ms,
                "updated_at": created_ms,
            }
            for s in statuses
        ],
    )
    conn.execute(
        sa.insert(tables.workflow_input),
        [
            {
                "workflow_uuid": s["workflow_uuid"],
                "inputs": s["inputs"],
                "retention_timestamp": created_ms,
            }
            for s in statuses
        ],
    )


# --- the lease fence ----------------------------------------------------------------------


def gate_dequeue(allowed: Callable[[], bool]) -> None:
    """Make DBOS's queue threads claim nothing while ``allowed()`` is false.

    Every claim of a non-partitioned queue goes through
    ``SystemDatabase.start_queued_workflows`` (``_queue.queue_worker_thread``), so answering
    "nothing claimed" there pauses dequeuing, and it resumes by itself once ``allowed()``
    is true again. Patched on the class, before launch, because the queue thread starts
    inside ``DBOS.launch``; patching twice installs one gate."""
    from dbos._sys_db import SystemDatabase

    original: Any = getattr(SystemDatabase, "start_queued_workflows", None)
    if not callable(original):
        raise ConfigError(
            f"DBOS {installed_dbos_version()} has no SystemDatabase.start_queued_workflows; "
            "accessctl cannot pause dequeuing on it (see dbos_compat.py)"
        )
    if getattr(original, "_accessctl_gated", False):
        return

    @functools.wraps(original)
    def gated(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not allowed():
            return [], None  # claimed nothing, and no limit was the reason
        return original(self, *args, **kwargs)

    gated._accessctl_gated = True  # type: ignore[attr-defined]
    SystemDatabase.start_queued_workflows = gated  # type: ignore[method-assign]


def execution_token(workflow_id: str) -> str | None:
    """The ownership token DBOS stamped on ``workflow_id``'s row (``owner_xid``) when this
    thread's execution claimed it; recovery clears it, so a token no longer on the row
    means the execution was replaced. DBOS refuses such an execution's writes, but not
    its provider calls."""
    from dbos._context import current_owner_xid

    return current_owner_xid(workflow_id)


# --- adoption -------------------------------------------------------------------------------


def requeue_for_adoption(workflow_id: str, executor_id: str) -> None:
    """Put a dead executor's PENDING workflow back on its queue, as DBOS's own recovery
    does for its own executor at launch (it then starts again through the queue)."""
    from dbos._dbos import _get_dbos_instance
    from dbos._recovery import _recover_workflow
    from dbos._sys_db import GetPendingWorkflowsOutput

    _recover_workflow(
        _get_dbos_instance(), GetPendingWorkflowsOutput(workflow_id=workflow_id), [executor_id]
    )

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
``requests_running``)  waits for every workflow, batch followers   exit 143);
                       included, which wait on requests nobody     test_dbos_contract.py::
                       runs any more: every stop would cost the    test_a_clean_exit_waits_
                       whole grace. We stop the queue threads,     for_the_requests_it_claimed
                       let a claim in flight end (DBOS's
                       ``queue-worker-*`` threads), and wait for
                       requests only, claimed ones included.
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
polling pace           DBOS polls every queue at a fixed interval, test_pacing.py; test_dbos_
(``pace_dbos_loops``)  re-reading its row each time, lists queues  contract.py::test_dbos_loops_
                       and runs its delayed-work job every second: wait_through_the_pacer;
                       ~80 transactions a second for an idle       bench/ (idle workers)
                       worker, with no setting to change it. Its
                       loops wait through our pacer instead.
slot refill            DBOS's queue thread refills a slot freed by test_dbos_contract.py::
(``pace_dbos_loops``,  a finished workflow only at its next poll;  test_a_request_ending_frees_
``ActiveWorkflowBy     nothing public says when one ends. DBOS's   its_slot_for_its_queue;
Id._remove``)          count of a process's running workflows is   test_pacing.py (freed slots);
                       where a slot frees: the hook tells the      bench/ (workers)
                       pacer there, and the queue looks at once.
claim turns            DBOS claims in REPEATABLE READ with NOWAIT  test_dbos_contract.py::
(``serialize_          row locks: overlapping claimers fail, and   test_claims_go_through_the_
postgres_claims``)     DBOS doubles the interval after a failure,  serialized_begin; test_faults
                       so more workers were slower. Claims take    .py (3 processes, one limit)
                       turns behind an advisory lock instead.
one-statement claim    DBOS's claim is six round trips, and its    test_dbos_contract.py::
(``claim_once``,       queue thread then reads the claimed rows    test_the_one_statement_claim_
``claim_in_one_        back in three more, serially, while their   equals_dbos_claim; test_faults
statement``)           slots are taken and nothing runs. On        .py, test_concurrency_shares
                       Postgres, with a queue-wide concurrency     .py (real workers, one limit)
                       and no limiter, the count, the select and
                       the update are one statement that returns
                       the statuses, and the read-back is served
                       from it.
process share          DBOS's per-process limit lives in the       test_faults.py::test_three_
(``cap_process_        queue's row, shared by every process; an    workers_share_one_global_
concurrency``,         operator's cap for one host                 limit; test_faults.py::test_
``share_concurrency``, (ACCESSCTL_WORKER_CONCURRENCY), or this     database_restart_runs_every_
``ActiveWorkflowBy     process's share among the live executors,   request_once; test_shared_
Id.add``)              is applied to its claims only, and a        limit.py::test_a_process_
                       process at it takes no claim turn. DBOS     takes_no_more_than_its_own_
                       counts a claimed workflow as running only   share; test_concurrency_
                       once its thread starts; we count it from    shares.py; test_dbos_
                       its claim.                                  contract.py
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
import copy
import functools
import os
import sqlite3
import threading
import time
import weakref
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


def stop_dequeuing(timeout: float) -> None:
    """Stop this process's DBOS queue threads, and wait (up to ``timeout`` seconds) for
    the claim each may be in the middle of: nothing is dequeued from here on, and every
    workflow claimed here is counted by ``requests_running``."""
    from dbos._dbos import _get_dbos_instance

    from accessctl.pacing import pacer

    dbos = _get_dbos_instance()
    for stop in dbos.background_thread_stop_events:
        stop.set()
    dbos._background_jobs_stop_event.set()  # our delayed-work loop (pace_dbos_loops)
    pacer().wake()  # paced waits see their stop now, not at their next check
    # DBOS runs each queue's claims in a thread named after the queue; a claim already
    # sent to the database completes, and its workflows are dispatched, after the stop.
    deadline = time.monotonic() + timeout
    claimers = [t for t in threading.enumerate() if t.name.startswith("queue-worker-")]
    for thread in claimers:
        # A thread still starting (listed, not yet alive) cannot be joined; it sees the
        # stop before its first claim.
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def requests_running(queue_name: str) -> int:
    """Workflows of ``queue_name`` this process is executing now, or has claimed and is
    about to start: a clean exit that left one of those would strand it (PENDING under
    this executor ID) until another process adopted it."""
    from dbos._dbos import _get_dbos_instance

    running = _get_dbos_instance()._active_workflows_set.count_for_queue(queue_name)
    return int(running) + starting.count(queue_name)


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

    claim_in_one_statement()  # innermost: the gate wraps it
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


# --- the claim in one statement ---------------------------------------------------------


def claim_in_one_statement() -> None:
    """Route DBOS's queue claims through ``claim_once`` where it applies (Postgres, a
    queue-wide concurrency, no rate limiter), and serve DBOS's read-back of what a claim
    just took from that claim. Installed before the lease gate and the pacer's hooks,
    which wrap it; installing twice installs once."""
    from dbos._sys_db import SystemDatabase

    for attribute in ("start_queued_workflows", "get_workflow_statuses", "_now_ms_sql"):
        if not callable(getattr(SystemDatabase, attribute, None)):
            raise ConfigError(
                f"DBOS {installed_dbos_version()} has no SystemDatabase.{attribute}; "
                "accessctl cannot claim on it (see dbos_compat.py)"
            )
    dbos_claim: Any = SystemDatabase.start_queued_workflows
    if getattr(dbos_claim, "_accessctl_one_statement", False):
        return
    dbos_statuses: Any = SystemDatabase.get_workflow_statuses

    @functools.wraps(dbos_claim)
    def one_statement_claim(
        self: Any,
        queue: Any,
        executor_id: str,
        app_version: str,
        queue_partition_key: str | None,
        local_running_count: int = 0,
        partition_local_running_count: int = 0,
        *,
        owner_xid: str | None = None,
        is_latest_version: bool | None = None,
    ) -> Any:
        if queue_partition_key is None:
            claimed = claim_once(
                self,
                queue,
                executor_id,
                app_version,
                local_running_count,
                owner_xid=owner_xid,
                is_latest_version=is_latest_version,
            )
            if claimed is not None:
                return claimed
        return dbos_claim(
            self,
            queue,
            executor_id,
            app_version,
            queue_partition_key,
            local_running_count,
            partition_local_running_count,
            owner_xid=owner_xid,
            is_latest_version=is_latest_version,
        )

    @functools.wraps(dbos_statuses)
    def statuses_claimed_here(self: Any, workflow_ids: list[str]) -> Any:
        # DBOS's queue thread reads back what it has just claimed, in the same thread:
        # served from the claim, once.
        claimed: dict[str, Any] = getattr(_claimed_here, "statuses", {})
        if workflow_ids and all(w in claimed for w in workflow_ids):
            _claimed_here.statuses = {}
            return [claimed[w] for w in workflow_ids]
        return dbos_statuses(self, workflow_ids)

    one_statement_claim._accessctl_one_statement = True  # type: ignore[attr-defined]
    SystemDatabase.start_queued_workflows = one_statement_claim  # type: ignore[method-assign]
    if not getattr(dbos_statuses, "_accessctl_read_back", False):
        statuses_claimed_here._accessctl_read_back = True  # type: ignore[attr-defined]
        SystemDatabase.get_workflow_statuses = statuses_claimed_here  # type: ignore[method-assign]


# Claims made in one statement in this process (the contract test reads it).
one_statement_claims = 0
# The statuses this thread's last one-statement claim returned, until DBOS's queue thread
# reads them back (right after the claim, in the same thread).
_claimed_here = threading.local()
# The claim statement, built once per DBOS system database.
_claim_statements: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def claim_once(
    sys_db: Any,
    queue: Any,
    executor_id: str,
    app_version: str,
    local_running_count: int,
    *,
    owner_xid: str | None,
    is_latest_version: bool | None,
) -> tuple[list[str], str | None] | None:
    """Claim ``queue``'s next workflows as DBOS's ``start_queued_workflows`` does, in one
    statement that also returns their statuses; None where it does not apply (SQLite, a
    sharded database, a rate limiter, partitions, no queue-wide concurrency, claims not
    taking turns), and DBOS's own claim runs.

    DBOS 3.4's claim is six round trips (the begin, the claim turn's lock, the count of
    running workflows, the select, the update, the commit) and its queue thread then
    reads the claimed rows back in a transaction of three more, one after the other in
    the queue's one thread, while the claimed requests hold their slots and nothing runs
    (BENCHMARKS.md, #17). Here, after the claim turn's lock, the count, the select and the
    update are one statement; the claim turn keeps the count exact across processes, as
    it does for DBOS's claim (``serialize_postgres_claims``)."""
    from dbos._sys_db_postgres import PostgresSystemDatabase

    if (
        sys_db.engine.dialect.name != "postgresql"
        or not getattr(PostgresSystemDatabase._begin, "_accessctl_serialized", False)
        or sys_db.sharded
        or queue._has_partition_limits()
        or queue._limiter is not None
        or queue._concurrency is None
        or is_latest_version is None
    ):
        return None
    concurrency = int(queue._concurrency)
    room = concurrency
    if queue._worker_concurrency is not None:
        room = min(room, int(queue._worker_concurrency) - int(local_running_count))
        if room <= 0:
            return [], "worker_concurrency"
    params = {
        "queue": queue.name,
        "room": room,
        "concurrency": concurrency,
        "version": app_version,
        "any_version": bool(is_latest_version),
        "owner_xid": owner_xid,
        "executor_id": executor_id,
        "start_ms": int(time.time() * 1000),
    }
    global one_statement_claims
    one_statement_claims += 1
    with sys_db._begin(None) as conn:  # the claim turn (serialize_postgres_claims)
        rows = conn.execute(_claim_statement(sys_db), params).all()
    running = int(rows[0].running) if rows else 0
    claimed = sorted(
        (r for r in rows if r.workflow_uuid is not None),
        key=lambda r: (r.priority, r.created_at, r.workflow_uuid),
    )
    _claimed_here.statuses = {row.workflow_uuid: _status_of(row) for row in claimed}
    if not claimed and running >= concurrency:
        return [], "concurrency"
    return [row.workflow_uuid for row in claimed], None


# DBOS's ``WorkflowStatusInternal`` keys and the ``workflow_status`` columns its read-back
# (``get_workflow_statuses``) fills them from; ``inputs`` also reads ``workflow_input``.
_STATUS_COLUMNS = {
    **{
        key: key
        for key in (
            "workflow_uuid", "status", "name", "recovery_attempts", "config_name",
            "class_name", "authenticated_user", "authenticated_roles", "assumed_role",
            "queue_name", "executor_id", "created_at", "updated_at",
            "workflow_deadline_epoch_ms", "workflow_timeout_ms", "deduplication_id",
            "priority", "queue_partition_key", "forked_from", "parent_workflow_id",
            "started_at_epoch_ms", "serialization", "delay_until_epoch_ms", "attributes",
            "schedule_name", "debounce_deadline_epoch_ms", "is_debounced", "application_name",
        )
    },
    "app_version": "application_version",
    "app_id": "application_id",
}  # fmt: skip


def _status_of(row: Any) -> dict[str, Any]:
    """DBOS's ``WorkflowStatusInternal`` for a claimed row, as its read-back builds it."""
    m = row._mapping
    status = {key: m[column] for key, column in _STATUS_COLUMNS.items()}
    status["is_debounced"] = bool(status["is_debounced"])
    return {**status, "inputs": m["inputs"], "shard_key": None}


# DBOS's cap on a deadline computed from a timeout (``_MAX_BIGINT`` in its claim).
_MAX_BIGINT = 2**63 - 1


def _claim_statement(sys_db: Any) -> Any:
    """The one-statement claim for ``sys_db``'s tables: how many of the queue's workflows
    run now (every process's), then the next ``LEAST(room, concurrency - running)``
    queued ones, locked, then marked PENDING as DBOS's claim marks them; one row per
    claimed workflow with its status and inputs, or one row with only ``running``."""
    built = _claim_statements.get(sys_db)
    if built is not None:
        return built
    import sqlalchemy as sa
    from dbos import WorkflowStatusString

    ws = sys_db.tables.workflow_status
    wi = sys_db.tables.workflow_input
    enqueued = WorkflowStatusString.ENQUEUED.value
    pending = WorkflowStatusString.PENDING.value
    mine = sys_db._name_filter
    queue = sa.bindparam("queue", type_=sa.Text)
    running = (
        sa.select(sa.func.count().label("n"))
        .select_from(ws)
        .where(sys_db._queue_pending_filter(queue))
        .cte("running")
    )
    version = sa.bindparam("version", type_=sa.Text)
    picked = (
        sa.select(ws.c.workflow_uuid)
        .where(ws.c.queue_name == queue)
        .where(ws.c.status == enqueued)
        .where(
            sa.or_(
                ws.c.application_version == version,
                sa.and_(
                    sa.bindparam("any_version", type_=sa.Boolean),
                    ws.c.application_version.is_(None),
                ),
            )
        )
        .where(mine(ws.c.application_name, sys_db.app_name))
        .order_by(ws.c.priority.asc(), ws.c.created_at.asc())
        .limit(
            sa.func.greatest(
                0,
                sa.func.least(
                    sa.bindparam("room", type_=sa.Integer),
                    sa.bindparam("concurrency", type_=sa.Integer)
                    - sa.select(running.c.n).scalar_subquery(),
                ),
            )
        )
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    start_ms = sa.bindparam("start_ms", type_=sa.BigInteger)
    now_ms = sys_db._now_ms_sql()
    claimed = (
        ws.update()
        # By primary key, from an array: a join with ``picked`` let the planner scan every
        # queued row (its estimate of them lags a batch just filed), 10 ms for 3,000.
        .where(
            ws.c.workflow_uuid
            == sa.any_(sa.func.array(sa.select(picked.c.workflow_uuid).scalar_subquery()))
        )
        # No recheck of the status and owner, which DBOS's update makes after its select:
        # here the select locked these rows in this statement, and nothing changed them.
        .values(
            status=pending,
            owner_xid=sa.bindparam("owner_xid", type_=sa.Text),
            application_version=version,
            executor_id=sa.bindparam("executor_id", type_=sa.Text),
            application_name=sys_db.app_name,
            started_at_epoch_ms=now_ms,
            rate_limited=False,
            recovery_attempts=ws.c.recovery_attempts + 1,
            updated_at=now_ms,
            workflow_deadline_epoch_ms=sa.case(
                (
                    sa.and_(
                        ws.c.workflow_timeout_ms.isnot(None),
                        ws.c.workflow_deadline_epoch_ms.is_(None),
                    ),
                    sa.case(
                        (ws.c.workflow_timeout_ms > _MAX_BIGINT - start_ms, _MAX_BIGINT),
                        else_=start_ms + ws.c.workflow_timeout_ms,
                    ),
                ),
                else_=ws.c.workflow_deadline_epoch_ms,
            ),
        )
        .returning(
            *(ws.c[column] for column in _STATUS_COLUMNS.values()),
            sa.func.coalesce(
                sa.select(wi.c.inputs)
                .where(wi.c.workflow_uuid == ws.c.workflow_uuid)
                .scalar_subquery(),
                ws.c.inputs,
            ).label("inputs"),
        )
        .cte("claimed")
    )
    built = sa.select(
        sa.select(running.c.n).scalar_subquery().label("running"), claimed
    ).select_from(
        sa.select(sa.literal(1).label("one")).subquery("one").outerjoin(claimed, sa.true())
    )
    _claim_statements[sys_db] = built
    return built


# --- pacing ---------------------------------------------------------------------------------


class _PacedStop:
    """What a DBOS polling loop sees as its stop event: ``is_set``/``set`` are the real
    event's; ``wait`` is the pacer's (pacing.py), so an idle loop sleeps long and a
    wake-up, a due time or an opening window ends the sleep early."""

    def __init__(self, real: threading.Event, name: str) -> None:
        self.real = real
        self.name = name

    def is_set(self) -> bool:
        return self.real.is_set()

    def set(self) -> None:
        self.real.set()

    def wait(self, timeout: float | None = None) -> bool:
        from accessctl.pacing import pacer

        return pacer().wait(self.real, timeout or 0.0, self.name)


class _SlowStop(_PacedStop):
    """DBOS's queue manager only (re)starts queue threads, and our queues exist before
    launch; its schedule poller looks for schedules, and accessctl has none: both look
    every ``MANAGER_SEC`` instead of every second."""

    def wait(self, timeout: float | None = None) -> bool:
        return self.real.wait(MANAGER_SEC)


_in_queue_thread = threading.local()
# How often DBOS's queue manager lists the queues and its scheduler the schedules (DBOS:
# every second, the scheduler for its first minute).
MANAGER_SEC = 30.0
# How often a busy process moves due delayed tries onto their queue (DBOS: every second).
DELAYED_SEC = 1.0
# How long a process reuses a queue's row it read (DBOS re-reads it on every poll).
QUEUE_ROW_TTL_SEC = 1.0
# A queue found full (its queue-wide concurrency taken by other processes) is looked at
# again after a pause doubling from FULL_QUEUE_MIN_SEC * 2 up to FULL_QUEUE_MAX_SEC.
FULL_QUEUE_MIN_SEC = 0.01
FULL_QUEUE_MAX_SEC = 0.16
# A queue whose concurrency another process was seen holding counts as shared this long:
# a slot freed there is not refilled at once (its owner would race the others for it).
SHARED_QUEUE_SEC = 2.0
# A process without a part of the concurrency looks again this often, counting the live
# executors anew (Lease.peers) to learn whether one with a part has gone.
STANDBY_SEC = 1.0
# How long a process reuses DBOS's answer to "is this the latest application version?".
LATEST_VERSION_TTL_SEC = 10.0


def pace_dbos_loops() -> None:
    """Make DBOS's polling loops wait through this process's pacer (pacing.py).

    DBOS 3.4 polls every queue at its fixed interval whether or not anything is queued
    (re-reading the queue's row each time), lists the queues every second, and takes a
    lock for its delayed-work job every second: about 80 transactions a second for an
    idle worker (BENCHMARKS.md, "Idle workers"). There is no setting for any of it. We
    hand each loop a stop event whose ``wait`` is the pacer's (``_queue.queue_worker_thread``,
    ``_dbos.queue_thread`` and ``_dbos.dynamic_scheduler_loop`` are looked up by name when
    DBOS launches), run the delayed-work job ourselves at the pacer's pace, cache each
    queue's row for ``QUEUE_ROW_TTL_SEC`` in its queue thread, and tell the pacer what
    every claim found. Installed before launch; installing twice installs once."""
    from dbos import _dbos, _queue
    from dbos._core import ActiveWorkflowById
    from dbos._sys_db import SystemDatabase

    for owner, attribute in (
        (ActiveWorkflowById, "_remove"),
        (ActiveWorkflowById, "add"),
        (_queue, "queue_worker_thread"),
        (_dbos, "queue_thread"),
        (_dbos, "background_jobs_thread"),
        (_dbos, "dynamic_scheduler_loop"),
        (SystemDatabase, "start_queued_workflows"),
        (SystemDatabase, "get_queue"),
        (SystemDatabase, "transition_delayed_workflows"),
        (SystemDatabase, "_is_latest_version"),
    ):
        if not callable(getattr(owner, attribute, None)):
            raise ConfigError(
                f"DBOS {installed_dbos_version()} has no {attribute}; accessctl cannot pace "
                "its polling on it (see dbos_compat.py)"
            )
    if getattr(_queue.queue_worker_thread, "_accessctl_paced", False):
        return
    claim_in_one_statement()  # innermost: the pacer's hook wraps it

    worker_thread: Any = _queue.queue_worker_thread
    manager_thread: Any = _dbos.queue_thread  # type: ignore[attr-defined]
    scheduler_loop: Any = _dbos.dynamic_scheduler_loop  # type: ignore[attr-defined]

    @functools.wraps(worker_thread)
    def paced_worker(stop_event: Any, dbos: Any, queue: Any) -> None:
        real = stop_event.real if isinstance(stop_event, _PacedStop) else stop_event
        _in_queue_thread.active = True  # only a queue thread's own re-reads are cached
        worker_thread(_PacedStop(real, queue.name), dbos, queue)

    def paced_manager(stop_event: Any, dbos: Any) -> None:
        manager_thread(_SlowStop(stop_event, "manager"), dbos)

    def paced_scheduler(stop_event: Any, polling_interval_sec: float) -> None:
        scheduler_loop(_SlowStop(stop_event, "scheduler"), polling_interval_sec)

    def paced_jobs(stop_event: threading.Event, dbos: Any) -> None:
        # DBOS's job also cancels workflows past their timeout; accessctl sets none.
        paced = _PacedStop(stop_event, "delayed")
        while True:
            try:
                dbos._sys_db.transition_delayed_workflows()
            except Exception as exc:
                if not stop_event.is_set():
                    dbos.logger.warning(f"Exception moving delayed workflows: {exc}")
            if paced.wait(DELAYED_SEC):
                return

    claim: Any = SystemDatabase.start_queued_workflows
    read_queue: Any = SystemDatabase.get_queue
    rows: dict[tuple[int, str], tuple[float, int, Any]] = {}

    latest: dict[tuple[int, str], tuple[float, bool]] = {}
    # Queues whose concurrency other processes were seen holding, until when.
    shared_until: dict[str, float] = {}
    full_pause: dict[str, float] = {}

    def is_latest(sys_db: Any, app_version: str) -> bool:
        # DBOS asks on every claim (a query) whether this version is the latest, which
        # only decides whether version-less workflows (accessctl files none) may be taken.
        now = time.monotonic()
        hit = latest.get((id(sys_db), app_version))
        if hit is None or now - hit[0] >= LATEST_VERSION_TTL_SEC:
            hit = (now, bool(sys_db._is_latest_version(app_version)))
            latest[(id(sys_db), app_version)] = hit
        return hit[1]

    @functools.wraps(claim)
    def reported_claim(self: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        from accessctl.pacing import pacer

        cap, sharing = process_share(queue)
        standby = bool(sharing) and cap == 0  # no part while the others hold it all
        if cap is not None and queue._worker_concurrency is not None:
            # DBOS's queue row holds one per-process limit for every process; this
            # process's own cap or part applies to its claims only.
            queue = copy.copy(queue)
            queue._worker_concurrency = min(int(queue._worker_concurrency), cap)

        if kwargs.get("is_latest_version") is None and len(args) >= 2 and not self.sharded:
            kwargs["is_latest_version"] = is_latest(self, args[1])
        if len(args) >= 4 and (not_started := starting.count(queue.name)):
            # DBOS counts this process's running workflows from the moment each one's
            # thread starts; one claimed on an earlier poll whose thread has not started
            # yet (a busy host) counted as nothing, and could let a claim exceed the
            # per-process limit.
            args = (*args[:3], int(args[3]) + not_started, *args[4:])
        local = int(args[3]) if len(args) > 3 else 0
        if queue._worker_concurrency is not None and local >= int(queue._worker_concurrency):
            # DBOS would learn this inside its claim transaction (behind the claim lock);
            # a process at its share would take that lock at every look for nothing.
            claimed, reason = [], "worker_concurrency"
        else:
            claimed, reason = claim(self, queue, *args, **kwargs)
        starting.claimed(claimed, queue.name)
        paced = pacer()
        if claimed:
            paced.activity()
            paced.release(queue.name)
        elif reason == "limiter" and queue._limiter is not None:
            paced.activity()
            opens_in = window_opens_in(self, queue)
            if opens_in > 0:
                paced.hold(queue.name, opens_in + 0.002)
        elif reason is not None and not standby:
            paced.activity()  # a full concurrency limit: work is waiting
        if (
            reason == "concurrency"
            and queue._concurrency is not None
            and not sharing
            and local + len(claimed) < int(queue._concurrency)
        ):
            shared_until[queue.name] = time.monotonic() + SHARED_QUEUE_SEC
        if reason == "concurrency" and not claimed:
            # The queue-wide limit is full with other processes' requests: a slot frees
            # when one of theirs ends, which nothing here hears of. Look again after a
            # pause that doubles while it stays full (each look is a transaction: several
            # workers polling a full queue every 20 ms slowed each other down).
            pause = min(FULL_QUEUE_MAX_SEC, full_pause.get(queue.name, FULL_QUEUE_MIN_SEC) * 2)
            full_pause[queue.name] = pause
            paced.hold(queue.name, pause, until_freed=True)
        else:
            full_pause.pop(queue.name, None)
        if standby:
            # Nothing here changes that but one of the others leaving, which the next
            # look's executor count sees. Meanwhile this process is as idle as one with
            # nothing queued.
            paced.hold(queue.name, STANDBY_SEC)
        return claimed, reason

    @functools.wraps(read_queue)
    def cached_queue(self: Any, name: str, **kwargs: Any) -> Any:
        if kwargs or not getattr(_in_queue_thread, "active", False):
            return read_queue(self, name, **kwargs)
        from accessctl.pacing import pacer

        # A wake-up (new work, `limit set`) drops the cached row: the next claim counts
        # with the row as it is now.
        now, generation = time.monotonic(), pacer().generation
        hit = rows.get((id(self), name))
        if hit is not None and now - hit[0] < QUEUE_ROW_TTL_SEC and hit[1] == generation:
            return hit[2]
        row = read_queue(self, name)
        rows[(id(self), name)] = (now, generation, row)
        return row

    add_active: Any = ActiveWorkflowById.add

    @functools.wraps(add_active)
    def starting_add(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        entry = add_active(self, key, *args, **kwargs)
        starting.started(key)  # DBOS counts it from now on
        return entry

    remove_active: Any = ActiveWorkflowById._remove

    @functools.wraps(remove_active)
    def freeing_remove(self: Any, key: str, bucket: Any) -> None:
        # DBOS counts this process's running workflows per queue here, and its queue
        # thread refills a freed slot only at its next poll: tell the queue's loop now
        # (the outcome is written by then, so the queue-wide count has room too).
        remove_active(self, key, bucket)
        if bucket is not None and shared_until.get(bucket[0], 0.0) < time.monotonic():
            from accessctl.pacing import pacer

            pacer().slot_freed(bucket[0])

    paced_worker._accessctl_paced = True  # type: ignore[attr-defined]
    _queue.queue_worker_thread = paced_worker
    _dbos.queue_thread = paced_manager  # type: ignore[attr-defined]
    _dbos.background_jobs_thread = paced_jobs  # type: ignore[attr-defined]
    _dbos.dynamic_scheduler_loop = paced_scheduler  # type: ignore[attr-defined]
    SystemDatabase.start_queued_workflows = reported_claim  # type: ignore[method-assign]
    SystemDatabase.get_queue = cached_queue  # type: ignore[method-assign]
    ActiveWorkflowById._remove = freeing_remove  # type: ignore[method-assign]
    ActiveWorkflowById.add = starting_add  # type: ignore[method-assign]


class _Starting:
    """Workflows this process claimed whose thread has not started yet, by queue: DBOS's
    count of running workflows (``ActiveWorkflowById``) does not hold them until it
    starts. One that never starts (its dispatch failed) stops counting after
    ``STARTING_TTL_SEC``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claimed: dict[str, tuple[str, float]] = {}

    def claimed(self, workflow_ids: list[str], queue_name: str) -> None:
        if workflow_ids:
            now = time.monotonic()
            with self._lock:
                self._claimed.update((w, (queue_name, now)) for w in workflow_ids)

    def started(self, workflow_id: str) -> None:
        if self._claimed:
            with self._lock:
                self._claimed.pop(workflow_id, None)

    def count(self, queue_name: str) -> int:
        if not self._claimed:
            return 0
        oldest = time.monotonic() - STARTING_TTL_SEC
        with self._lock:
            for stale in [w for w, (_, at) in self._claimed.items() if at < oldest]:
                del self._claimed[stale]
            return sum(1 for q, _ in self._claimed.values() if q == queue_name)


starting = _Starting()
# A claimed workflow whose thread has not started after this long is not waited for.
STARTING_TTL_SEC = 5.0


# The most requests this process runs at once (``cap_process_concurrency``); None: as
# many as the shared concurrency allows.
process_concurrency: int | None = None
# The fewest slots an executor with a part of the concurrency takes (``share_of``).
MIN_SHARE = 5
# Where this process stands among the live executors (``share_concurrency``).
_peers: Callable[[], tuple[int, int] | None] | None = None
# The part this process last logged, by queue: (part, concurrency, executors).
_last_share: dict[str, tuple[int, int, int]] = {}


def cap_process_concurrency(cap: int | None) -> None:
    """Let this process take at most ``cap`` of the queue-wide concurrency. A worker
    takes every free slot it sees; on several hosts the first to look takes them all
    (ACCESSCTL_WORKER_CONCURRENCY, docs/operations.md)."""
    global process_concurrency
    process_concurrency = cap


def share_concurrency(peers: Callable[[], tuple[int, int] | None] | None) -> None:
    """Without a cap of its own, let this process take its share of the queue-wide
    concurrency: ``peers()`` says how many live executors come before it and how many
    there are (``Lease.peers``; None where unknown: then it takes what it finds free)."""
    global _peers
    _peers = peers
    _last_share.clear()


def share_active(total: int, executors: int) -> int:
    """How many of ``executors`` take a part of ``total`` slots (``share_of``)."""
    return max(1, min(executors, total // MIN_SHARE))


def share_of(total: int, ahead: int, executors: int) -> int:
    """One executor's part of ``total`` slots split between ``executors``: the first
    ones, as many as give each at least ``MIN_SHARE``, take parts within one of each
    other (the first ``total % active`` one larger) summing to ``total``; the rest take
    none until one of those is gone. Claims take turns (``serialize_postgres_claims``),
    and each claim refills only its own freed slots: parts smaller than that would cost
    a claim for every request or two, and the turns would bind first."""
    active = share_active(total, executors)
    if ahead >= active:
        return 0
    return total // active + (1 if ahead < total % active else 0)


def process_share(queue: Any) -> tuple[int | None, int]:
    """The most of ``queue``'s concurrency this process takes now, and how many
    executors share it out (0: none does; this process takes what it finds free). With a
    share, a slot it frees is its own to refill: no other executor, each within its
    share, takes it."""
    if process_concurrency is not None:
        return process_concurrency, 0
    seen = _peers() if _peers is not None and queue._concurrency is not None else None
    if seen is None:
        return None, 0
    total = int(queue._concurrency)
    if seen[1] <= 1:
        _tell_share(queue.name, total, total, 1)
        return None, 0
    share, active = share_of(total, *seen), share_active(total, seen[1])
    _tell_share(queue.name, share, total, seen[1])
    return share, active


def _tell_share(queue_name: str, share: int, total: int, executors: int) -> None:
    """Log this process's part when it changes (not its first, alone): an operator
    asking why a live worker runs nothing finds the answer in its log."""
    last = _last_share.get(queue_name)
    _last_share[queue_name] = (share, total, executors)
    if last == (share, total, executors) or (last is None and executors == 1):
        return
    import structlog

    structlog.get_logger(__name__).info(
        "concurrency share" if share else "standing by: other executors hold the concurrency",
        queue=queue_name,
        share=share,
        concurrency=total,
        executors=executors,
    )


def window_opens_in(sys_db: Any, queue: Any) -> float:
    """Seconds until ``queue``'s rate-limit window has room again: when the L-th most
    recent start counted by DBOS's limiter leaves the window. The same predicate and the
    same (database) clock as the limiter's count in ``start_queued_workflows``; 0 when
    the window has room now."""
    import sqlalchemy as sa
    from dbos import WorkflowStatusString

    limiter = queue._limiter
    ws = sys_db.tables.workflow_status
    period_ms = int(limiter["period"] * 1000)
    now = sys_db._now_ms_sql()
    lth_start = (
        sa.select(ws.c.started_at_epoch_ms)
        .where(*sys_db._scoped(ws))
        .where(ws.c.queue_name == queue.name)
        .where(ws.c.rate_limited == sa.literal_column("TRUE"))
        .where(
            ws.c.status.notin_(
                [WorkflowStatusString.ENQUEUED.value, WorkflowStatusString.DELAYED.value]
            )
        )
        .where(ws.c.started_at_epoch_ms > now - period_ms)
        .where(sys_db._name_filter(ws.c.application_name, sys_db.app_name))
        .order_by(ws.c.started_at_epoch_ms.desc())
        .offset(max(0, int(limiter["limit"]) - 1))
        .limit(1)
        .scalar_subquery()
    )
    with sys_db.engine.connect() as conn:
        ms = conn.execute(sa.select(lth_start + period_ms - now)).scalar()
    return max(0.0, float(ms) / 1000) if ms is not None else 0.0


def serialize_postgres_claims() -> None:
    """Make DBOS's queue claims on Postgres take turns: READ COMMITTED behind one
    transaction-scoped advisory lock, instead of REPEATABLE READ with ``NOWAIT`` row
    locks. Under DBOS's isolation, claimers that overlap fail (lock conflicts,
    serialization failures) and DBOS answers a failure by doubling that queue's polling
    interval, so several busy workers slowed each other down (BENCHMARKS.md, "Workers").
    Taking turns keeps the limiter exact: each claim counts the window after the previous
    claim committed (the lock is released only once its commit is visible)."""
    from dbos._sys_db_postgres import PostgresSystemDatabase

    if not callable(getattr(PostgresSystemDatabase, "_begin", None)):
        raise ConfigError(
            f"DBOS {installed_dbos_version()} has no SystemDatabase._begin; accessctl "
            "cannot serialize Postgres queue claims on it (see dbos_compat.py)"
        )
    if getattr(PostgresSystemDatabase._begin, "_accessctl_serialized", False):
        return

    @contextlib.contextmanager
    def _begin_in_turn(self: Any, isolation: str | None) -> Iterator[Any]:
        global serialized_claims
        serialized_claims += 1
        with self.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({CLAIM_LOCK_KEY})")
            yield conn

    _begin_in_turn._accessctl_serialized = True  # type: ignore[attr-defined]
    PostgresSystemDatabase._begin = _begin_in_turn  # type: ignore[method-assign]


# The advisory lock claims take turns on (an arbitrary constant, "accessctl-claims").
CLAIM_LOCK_KEY = 0x616363657373636C

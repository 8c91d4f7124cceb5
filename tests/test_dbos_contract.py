"""Contract tests of dbos_compat.py: each hook still does what it is there for on the
installed DBOS, and fails loudly when DBOS drifts."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from accessctl import dbos_compat
from conftest import SEED, Cli


def test_the_installed_dbos_is_the_proven_one() -> None:
    # CI installs the pinned tree (pyproject's constraint-dependencies): a DBOS upgrade is
    # a deliberate change of PROVEN_DBOS_VERSION after these tests pass on it.
    assert dbos_compat.installed_dbos_version() == dbos_compat.PROVEN_DBOS_VERSION


def test_another_dbos_version_is_refused_unless_named_on_purpose(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dbos_compat, "installed_dbos_version", lambda: "9.9.9")
    refused = cli("submit", SEED[0])
    assert refused.exit_code == 3, refused.stderr
    line = refused.stderr.strip()
    assert line.count("\n") == 0 and "9.9.9" in line and dbos_compat.PROVEN_DBOS_VERSION in line
    assert dbos_compat.ALLOW_VARIABLE in line
    assert cli.scalar("SELECT count(*) FROM batches") == 0
    wrong = cli("submit", SEED[0], "--detach", ACCESSCTL_ALLOW_DBOS_VERSION="9.9.8")
    assert wrong.exit_code == 3
    allowed = cli("submit", SEED[0], ACCESSCTL_ALLOW_DBOS_VERSION="9.9.9")
    assert allowed.exit_code == 1, allowed.stderr  # ran: the seed user is unknown


def test_dbos_clock_expression_is_exact_on_our_engine(tmp_path: Path) -> None:
    """DBOS's own millisecond clock (the expression it puts in its SQL, read from DBOS on
    this Python) gives millisecond times on our SQLite engine: not whole seconds (3.11's
    strftime), not NULL (3.12+'s unixepoch('subsec') on SQLite < 3.42)."""
    from dbos._sys_db import SystemDatabase

    from accessctl.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'clock.sqlite'}", create_dir=True)
    expression = SystemDatabase._now_ms_sql(SimpleNamespace(engine=engine))  # type: ignore[arg-type]
    try:
        with engine.connect() as conn:
            values = []
            for _ in range(20):
                before = time.time() * 1000
                value = conn.execute(sa.select(expression)).scalar()
                after = time.time() * 1000
                assert value is not None, f"DBOS's clock is NULL on Python {sys.version_info}"
                assert before - 1 <= value <= after + 1
                values.append(int(value))
                time.sleep(0.003)
    finally:
        engine.dispose()
    # Whole seconds would make every value a multiple of 1000.
    assert any(v % 1000 for v in values), values


def test_claims_go_through_the_serialized_begin(cli: Cli) -> None:
    """DBOS's queue claims run in our serialized transaction (SQLite: BEGIN IMMEDIATE;
    Postgres: in turn, behind an advisory lock): if DBOS stopped calling ``_begin`` for
    them, this count would stay at zero."""
    from dbos._sys_db_postgres import PostgresSystemDatabase
    from dbos._sys_db_sqlite import SQLiteSystemDatabase

    before = dbos_compat.serialized_claims
    result = cli("submit", *SEED, "--json")
    assert result.exit_code == 1, result.stderr
    assert json.loads(result.stdout)["failed"] == 4
    assert dbos_compat.serialized_claims > before
    if cli.database_url.startswith("sqlite"):
        assert SQLiteSystemDatabase._begin.__qualname__.endswith("_begin_immediate")
    else:
        assert PostgresSystemDatabase._begin.__qualname__.endswith("_begin_in_turn")


def test_dbos_loops_wait_through_the_pacer(cli: Cli) -> None:
    """After a run, DBOS's queue threads, queue manager, scheduler and delayed-work job
    are ours (looked up by name at launch), and every claim told the pacer what it found:
    were DBOS to call its loops by other names, the run would still work, and this fails."""
    from dbos import _dbos, _queue

    from accessctl import pacing

    result = cli("submit", *SEED, "--json")
    assert result.exit_code == 1, result.stderr
    assert getattr(_queue.queue_worker_thread, "_accessctl_paced", False)
    for name in ("queue_thread", "dynamic_scheduler_loop", "background_jobs_thread"):
        assert getattr(_dbos, name).__qualname__.startswith("pace_dbos_loops."), name
    assert pacing.pacer().activities > 0  # the claims reported to this run's pacer


def test_a_request_ending_frees_its_slot_for_its_queue(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DBOS's count of this process's running workflows (``ActiveWorkflowById``) is where a
    slot frees; the hook tells the pacer which queue's slot it was, after DBOS wrote the
    outcome. Were DBOS to stop calling ``_remove``, freed slots would wait for the next
    poll again, and this fails."""
    from dbos._core import ActiveWorkflowById

    from accessctl import pacing
    from accessctl.workflows import BATCH_QUEUE_NAME, QUEUE_NAME

    freed: list[str] = []
    slot_freed = pacing.Pacer.slot_freed

    def record(self: pacing.Pacer, name: str) -> None:
        freed.append(name)
        slot_freed(self, name)

    monkeypatch.setattr(pacing.Pacer, "slot_freed", record)
    result = cli("submit", *SEED, "--json")
    assert result.exit_code == 1, result.stderr
    assert hasattr(ActiveWorkflowById._remove, "__wrapped__")  # ours, around DBOS's
    assert freed.count(QUEUE_NAME) == len(SEED)
    assert freed.count(BATCH_QUEUE_NAME) == 1
    # Every workflow it claimed was seen starting (``ActiveWorkflowById.add``): none is
    # still counted as claimed-but-not-started against the per-process limit.
    assert hasattr(ActiveWorkflowById.add, "__wrapped__")
    assert dbos_compat.starting.count(QUEUE_NAME) == 0


def test_claimed_workflows_count_against_the_process_until_they_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A workflow claimed on one poll whose thread has not started by the next is this
    process's all the same (DBOS's own count would miss it), until it starts or, if it
    never does, for ``STARTING_TTL_SEC``."""
    starting = dbos_compat._Starting()
    starting.claimed(["a", "b"], "requests")
    starting.claimed(["c"], "batches")
    starting.claimed([], "requests")
    assert (starting.count("requests"), starting.count("batches")) == (2, 1)
    starting.started("a")
    starting.started("not-ours")  # a workflow nobody claimed here (a direct call)
    assert starting.count("requests") == 1
    monkeypatch.setattr(dbos_compat, "STARTING_TTL_SEC", 0.0)
    assert (starting.count("requests"), starting.count("batches")) == (0, 0)


def test_a_clean_exit_waits_for_the_requests_it_claimed(cli: Cli) -> None:
    """A stop that comes between a claim and the start of what it claimed (a busy host:
    another run's request claimed as this run's own batch ended) waits for those requests
    too. Leaving one would strand it, PENDING under this executor ID, until another
    process adopted it: a second dispatch (recovery_attempts 2, seen once in two
    concurrent batches) and, on Postgres, a wait of the adoption grace. The stop also
    waits out a claim already sent (DBOS's per-queue claim thread, ``queue-worker-*``):
    were DBOS to rename that thread, the first assertion fails."""
    from accessctl.logs import configure_logging
    from accessctl.runtime import drain_requests, executing_runtime
    from accessctl.settings import resolve_settings
    from accessctl.workflows import QUEUE_NAME

    def claim_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == f"queue-worker-{QUEUE_NAME}"]

    configure_logging("json")  # as the CLI does first (see test_replay.py)
    settings = resolve_settings(env={"ACCESSCTL_DATABASE_URL": cli.database_url})
    with executing_runtime(settings):
        deadline = time.monotonic() + 30
        while not claim_threads():
            assert time.monotonic() < deadline, "DBOS started no claim thread for the queue"
            time.sleep(0.01)
        dbos_compat.starting.claimed(["claimed-not-started"], QUEUE_NAME)
        try:
            assert dbos_compat.requests_running(QUEUE_NAME) == 1
            threading.Timer(0.3, dbos_compat.starting.started, ["claimed-not-started"]).start()
            began = time.monotonic()
            drain_requests(grace=10)
            waited = time.monotonic() - began
        finally:
            dbos_compat.starting.started("claimed-not-started")
        assert 0.25 <= waited < 10
        assert not any(t.is_alive() for t in claim_threads())


def test_a_claim_thread_still_starting_does_not_break_the_stop(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DBOS's queue manager can be starting a queue's claim thread as the stop comes:
    listed by ``threading.enumerate`` but not alive yet, and joining it raises. The stop
    must go on (the thread sees the stop before its first claim)."""
    from accessctl.logs import configure_logging
    from accessctl.runtime import drain_requests, executing_runtime
    from accessctl.settings import resolve_settings

    starting_up = threading.Thread(target=lambda: None, name="queue-worker-starting")
    listed = threading.enumerate
    monkeypatch.setattr(threading, "enumerate", lambda: [*listed(), starting_up])
    configure_logging("json")
    with executing_runtime(resolve_settings(env={"ACCESSCTL_DATABASE_URL": cli.database_url})):
        drain_requests(grace=5)


def test_the_dbos_instance_is_destroyed_whatever_the_drain_meets(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DBOS keeps one instance per process and ``DBOS(config=...)`` hands back one that
    exists: left behind by a failed stop, the next runtime in the process (the server's,
    a test's) got it with its threads stopped and its database gone, and waited forever."""
    from dbos import _dbos

    from accessctl import runtime
    from accessctl.logs import configure_logging
    from accessctl.settings import resolve_settings

    def failing_drain(grace: float) -> None:
        raise RuntimeError("the drain failed")

    monkeypatch.setattr(runtime, "drain_requests", failing_drain)
    configure_logging("json")
    settings = resolve_settings(env={"ACCESSCTL_DATABASE_URL": cli.database_url})
    with pytest.raises(RuntimeError, match="the drain failed"), runtime.executing_runtime(settings):
        assert _dbos._dbos_global_instance is not None
    assert _dbos._dbos_global_instance is None


def test_a_dbos_without_a_paced_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from dbos import _queue

    from accessctl.exceptions import ConfigError

    monkeypatch.delattr(_queue, "queue_worker_thread")
    with pytest.raises(ConfigError, match="queue_worker_thread"):
        dbos_compat.pace_dbos_loops()


def test_a_dbos_without_the_hooked_method_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from accessctl.exceptions import ConfigError

    class Renamed:  # what SQLiteSystemDatabase would be if DBOS renamed _begin
        pass

    import dbos._sys_db_sqlite as module

    monkeypatch.setattr(module, "SQLiteSystemDatabase", Renamed)
    with pytest.raises(ConfigError, match="_begin"):
        dbos_compat.serialize_sqlite_claims()


def _rows(engine: sa.Engine, table: str, ids: list[str]) -> list[dict[str, Any]]:
    prefix = "" if engine.dialect.name == "sqlite" else "dbos."
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT * FROM {prefix}{table} WHERE workflow_uuid IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": ids},
        ).mappings()
        return sorted((dict(r) for r in rows), key=lambda r: str(r["workflow_uuid"]))


def test_bulk_rows_equal_dbos_enqueued_rows(cli: Cli) -> None:
    """The same workflows, enqueued by DBOS's public enqueue_in_transaction and by our bulk
    path: every column of workflow_status and workflow_input is equal, except the ones
    that name the call itself (its ID, its moment, DBOS's per-call transaction ID)."""
    from accessctl.runtime import filing_client
    from accessctl.settings import resolve_settings
    from accessctl.workflows import QUEUE_NAME, WORKFLOW_VERSION

    settings = resolve_settings({"database_url": cli.database_url})
    engine = cli.engine()
    client = filing_client(settings, engine)
    retry = {"max_attempts": 5.0, "deadline": 300.0}
    args_of = [
        (str(uuid.uuid4()), SEED[i], None, 1, retry, *((1, 0.0, "key-1") if i == 2 else ()))
        for i in range(3)
    ]
    public = [f"parity-public-{i}" for i in range(3)]
    bulk = [f"parity-bulk-{i}" for i in range(3)]
    try:
        with engine.begin() as conn:
            for workflow_id, args in zip(public, args_of, strict=True):
                client.enqueue_in_transaction(
                    conn,
                    {
                        "queue_name": QUEUE_NAME,
                        "workflow_name": "accessctl.file_request",
                        "workflow_id": workflow_id,
                        "app_version": WORKFLOW_VERSION,
                    },
                    *args,
                )
        statuses = [
            dbos_compat.build_enqueue_status(
                client, QUEUE_NAME, "accessctl.file_request", workflow_id, WORKFLOW_VERSION, *a
            )
            for workflow_id, a in zip(bulk, args_of, strict=True)
        ]
        with engine.begin() as conn:
            dbos_compat.bulk_enqueue(client, conn, statuses, int(time.time() * 1000))
        call_specific = {"workflow_uuid", "created_at", "updated_at", "creator_xid"}
        for table in ("workflow_status", "workflow_input"):
            theirs, ours = _rows(engine, table, public), _rows(engine, table, bulk)
            assert len(theirs) == len(ours) == 3, table
            columns = set(theirs[0])
            assert columns == set(ours[0])
            for a, b in zip(theirs, ours, strict=True):
                for column in sorted(columns - call_specific - {"retention_timestamp"}):
                    assert a[column] == b[column], (table, column)
    finally:
        client.destroy()
        engine.dispose()


def test_the_one_statement_claim_equals_dbos_claim(cli: Cli) -> None:
    """The same queued workflows, claimed by DBOS's ``start_queued_workflows`` and by
    ``claim_once``: the same ones (in the same order), every column of their rows alike
    except those that name the call or the queue, the statuses DBOS would read back, and
    the same answer once the queue-wide or this process's concurrency is full."""
    import inspect

    from dbos._sys_db import SystemDatabase

    from accessctl.runtime import filing_client
    from accessctl.settings import resolve_settings
    from accessctl.workflows import WORKFLOW_VERSION

    if cli.database_url.startswith("sqlite"):
        pytest.skip("the one-statement claim is for Postgres; SQLite keeps DBOS's claim")
    dbos_compat.serialize_postgres_claims()
    dbos_compat.claim_in_one_statement()
    dbos_claim: Any = inspect.unwrap(SystemDatabase.start_queued_workflows)
    dbos_statuses: Any = inspect.unwrap(SystemDatabase.get_workflow_statuses)
    settings = resolve_settings({"database_url": cli.database_url})
    engine = cli.engine()
    client = filing_client(settings, engine)
    sys_db: Any = client._sys_db
    try:
        ids: dict[str, list[str]] = {}
        for name in ("parity-dbos", "parity-ours"):
            client.register_queue(name, global_concurrency=3, worker_concurrency=3)
            ids[name] = [f"{name}-{i}" for i in range(5)]
            for workflow_id in ids[name]:
                with engine.begin() as conn:
                    client.enqueue_in_transaction(
                        conn,
                        {
                            "queue_name": name,
                            "workflow_name": "accessctl.file_request",
                            "workflow_id": workflow_id,
                            "app_version": WORKFLOW_VERSION,
                        },
                        str(uuid.uuid4()),
                        SEED[0],
                    )
        dbos_queue, our_queue = sys_db.get_queue("parity-dbos"), sys_db.get_queue("parity-ours")

        def theirs(local: int) -> tuple[list[str], str | None]:
            claimed: tuple[list[str], str | None] = dbos_claim(
                sys_db, dbos_queue, "executor-1", WORKFLOW_VERSION, None, local,
                owner_xid="xid-dbos", is_latest_version=True,
            )  # fmt: skip
            return claimed

        def ours(local: int) -> tuple[list[str], str | None] | None:
            return dbos_compat.claim_once(
                sys_db, our_queue, "executor-1", WORKFLOW_VERSION, local,
                owner_xid="xid-ours", is_latest_version=True,
            )  # fmt: skip

        before = dbos_compat.one_statement_claims
        taken_by_dbos, taken_here = theirs(0), ours(0)
        assert dbos_compat.one_statement_claims == before + 1
        assert taken_by_dbos == (ids["parity-dbos"][:3], None)
        assert taken_here == (ids["parity-ours"][:3], None)
        # What the claim returned is what DBOS reads back, and DBOS's read-back (hooked)
        # is served from it once.
        read_back = dbos_statuses(sys_db, taken_here[0])
        assert SystemDatabase.get_workflow_statuses(sys_db, taken_here[0]) == read_back
        call_specific = {
            "workflow_uuid", "queue_name", "owner_xid", "created_at", "updated_at",
            "started_at_epoch_ms", "creator_xid",
        }  # fmt: skip
        theirs_rows = _rows(engine, "workflow_status", ids["parity-dbos"])
        our_rows = _rows(engine, "workflow_status", ids["parity-ours"])
        for a, b in zip(theirs_rows, our_rows, strict=True):
            for column in sorted(set(a) - call_specific):
                assert a[column] == b[column], column
        assert {r["owner_xid"] for r in our_rows[:3]} == {"xid-ours"}
        for row in our_rows[:3]:  # the database's clock, as DBOS stamps it
            assert row["started_at_epoch_ms"] == row["updated_at"] > 0
        # The queue-wide concurrency is full: nothing claimed, and that is the reason.
        assert theirs(0) == ours(0) == ([], "concurrency")
        # One ends: one slot, and this process's own limit binds as DBOS's does.
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"UPDATE {cli.workflow_table} SET status = 'SUCCESS' "
                    "WHERE workflow_uuid IN (:a, :b)"
                ),
                {"a": ids["parity-dbos"][0], "b": ids["parity-ours"][0]},
            )
        assert theirs(3) == ours(3) == ([], "worker_concurrency")
        assert theirs(2) == (ids["parity-dbos"][3:4], None)
        assert ours(2) == (ids["parity-ours"][3:4], None)
        # Where it does not apply, it says so, and DBOS's claim runs.
        limited = SimpleNamespace(**{**vars(our_queue), "_limiter": {"limit": 5, "period": 1.0}})
        limited._has_partition_limits = lambda: False
        assert dbos_compat.claim_once(
            sys_db, limited, "executor-1", WORKFLOW_VERSION, 0,
            owner_xid="x", is_latest_version=True,
        ) is None  # fmt: skip
    finally:
        client.destroy()
        engine.dispose()

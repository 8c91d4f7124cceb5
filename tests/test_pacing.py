"""Idle executors wait long and wake at once (pacing.py, dbos_compat.pace_dbos_loops):
the pacer's waits, what wakes it on each backend, the limiter window it waits out, and
an idle worker that takes new work, and a retry that falls due, without polling for it.
What idle costs (CPU, transactions a second) is measured in bench/, not here."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from accessctl import pacing
from accessctl.pacing import FollowPace, Pacer
from accessctl.testing.provider import FakeProvider
from conftest import POSTGRES_URL, Cli
from test_faults import wait_for

needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="ACCESSCTL_TEST_POSTGRES_URL not set")


@pytest.fixture
def pg_engine() -> Iterator[sa.Engine]:
    # NOTIFY touches no data: the test server's own database will do.
    engine = sa.create_engine(POSTGRES_URL)
    try:
        yield engine
    finally:
        engine.dispose()


def timed_wait(pacer: Pacer, busy_interval: float, name: str = "", stop: Any = None) -> float:
    started = time.monotonic()
    stopped = pacer.wait(stop or threading.Event(), busy_interval, name)
    assert not stopped
    return time.monotonic() - started


def idle_pacer(**kwargs: Any) -> Pacer:
    pacer = Pacer(idle_after=0.2, **kwargs)
    time.sleep(0.25)
    assert not pacer.busy()
    return pacer


def test_a_busy_pacer_waits_the_loops_own_interval_and_an_idle_one_the_idle_poll() -> None:
    pacer = Pacer(idle_poll=0.6, idle_after=0.3)
    assert pacer.busy()  # a new process takes what is queued at once
    assert timed_wait(pacer, 0.05) < 0.3
    time.sleep(0.3)
    assert not pacer.busy()
    assert 0.55 <= timed_wait(pacer, 0.05) < 1.0
    pacer.activity()
    assert pacer.busy() and timed_wait(pacer, 0.05) < 0.3


def test_running_requests_keep_a_process_busy() -> None:
    pacer = idle_pacer(idle_poll=5.0)
    running = [1]
    pacer.count_running(lambda: running[0])
    assert pacer.busy() and timed_wait(pacer, 0.05) < 0.5
    running[0] = 0
    assert not pacer.busy()

    def broken() -> int:
        raise RuntimeError("a count that fails never stops a loop: it counts as work")

    pacer.count_running(broken)
    assert pacer.busy()


def test_a_wake_ends_every_idle_wait_at_once() -> None:
    pacer = idle_pacer(idle_poll=30.0)
    waited: list[float] = []
    threads = [
        threading.Thread(target=lambda name=name: waited.append(timed_wait(pacer, 0.05, name)))
        for name in ("requests", "batches", "lease")
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    pacer.wake()
    for thread in threads:
        thread.join(timeout=5)
    assert len(waited) == 3 and max(waited) < 1.0, waited
    assert pacer.busy()  # woken for work: the loops keep their own pace for a while


def test_a_due_time_ends_the_idle_wait_when_it_falls_due() -> None:
    pacer = idle_pacer(idle_poll=30.0)
    pacer.due_in(0.4)
    assert 0.35 <= timed_wait(pacer, 0.05) < 1.0
    assert pacer.busy()  # the due try is work: every loop was woken for it
    assert pacer.wakeups == 1


def test_a_held_loop_waits_for_its_window_whatever_else_it_would_do() -> None:
    pacer = Pacer(idle_poll=30.0, idle_after=10.0)
    pacer.hold("requests", 0.5)
    assert pacer.busy()
    assert 0.45 <= timed_wait(pacer, 0.01, "requests") < 1.0  # not the busy 10 ms
    assert timed_wait(pacer, 0.01, "requests") < 0.2  # the hold is spent: its own pace again
    pacer.hold("requests", 5.0)
    pacer.release("requests")
    assert timed_wait(pacer, 0.01, "requests") < 0.2


def test_a_freed_slot_ends_the_busy_wait_of_its_own_queue_only() -> None:
    pacer = Pacer(idle_poll=30.0, idle_after=10.0)
    waited: dict[str, float] = {}
    threads = [
        threading.Thread(
            target=lambda name=name: waited.update({name: timed_wait(pacer, 1.0, name)})
        )
        for name in ("requests", "batches")
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    pacer.slot_freed("requests")
    threads[0].join(timeout=5)
    assert waited["requests"] < 0.5  # not its 1-s interval
    assert "batches" not in waited  # another queue's slot is none of its business
    threads[1].join(timeout=5)
    assert waited["batches"] >= 0.95

    unrefilled = Pacer(idle_poll=30.0, idle_after=10.0, refill=False)  # SQLite (backend.py)
    threading.Timer(0.1, unrefilled.slot_freed, ("requests",)).start()
    assert timed_wait(unrefilled, 0.5, "requests") >= 0.45


def test_a_freed_slot_is_refilled_no_sooner_than_the_gap_after_the_last_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pacer = Pacer(idle_poll=30.0, idle_after=10.0)
    pacer.slot_freed("requests")  # before the wait began: counted by the look just made
    assert timed_wait(pacer, 0.3, "requests") >= 0.28
    monkeypatch.setattr(pacing, "REFILL_GAP_SEC", 0.3)
    freeing = threading.Timer(0.05, pacer.slot_freed, ("requests",))
    freeing.start()
    # Freed at 0.05 s: the look waits for the gap (0.3 s), not for its 1-s interval.
    assert 0.28 <= timed_wait(pacer, 1.0, "requests") < 0.9
    freeing.join()


def test_a_freed_slot_ends_a_full_queue_hold_but_never_a_limiter_window() -> None:
    pacer = Pacer(idle_poll=30.0, idle_after=10.0)
    pacer.hold("requests", 5.0, until_freed=True)  # full with other processes' requests
    threading.Timer(0.1, pacer.slot_freed, ("requests",)).start()
    assert timed_wait(pacer, 1.0, "requests") < 1.0
    pacer.hold("requests", 0.6)  # a limiter window: a free slot does not open it
    threading.Timer(0.1, pacer.slot_freed, ("requests",)).start()
    assert 0.55 <= timed_wait(pacer, 0.01, "requests") < 1.5


def test_a_stop_ends_a_long_wait_when_it_is_woken() -> None:
    pacer = idle_pacer(idle_poll=30.0)
    stop = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(pacer.wait(stop, 0.05)))
    thread.start()
    stop.set()
    pacer.wake()  # what stopping does (dbos_compat.stop_dequeuing, Adopter.stop)
    thread.join(timeout=2)
    assert result == [True]


def test_follow_pace_backs_off_while_nothing_changes_and_resets_on_change() -> None:
    pace = FollowPace(0.1, ceiling=1.0)
    assert [pace.after(False) for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert pace.after(True) == 0.1
    assert FollowPace(3.0, ceiling=1.0).after(False) == 3.0  # never below its base


def test_the_file_watcher_wakes_on_another_writer(tmp_path: Path) -> None:
    database = tmp_path / "a.sqlite"
    database.write_bytes(b"x")
    pacer = idle_pacer(idle_poll=30.0)
    watcher = pacing.FileWatcher(database, pacer)
    watcher.start()
    try:
        time.sleep(pacing.FILE_CHECK_SEC * 2)
        assert pacer.wakeups == 0  # nothing changed: no wake-up
        Path(f"{database}-wal").write_bytes(b"frames")
        wait_for(lambda: pacer.wakeups == 1, timeout=2, what="the watcher's wake-up")
    finally:
        watcher.stop()


@needs_postgres
def test_the_listener_wakes_on_work_announced_by_a_committed_transaction(
    pg_engine: sa.Engine,
) -> None:
    from accessctl.backend import POSTGRES

    pacer = idle_pacer(idle_poll=30.0)
    listener = pacing.WorkListener(pg_engine, pacer)
    listener.start()
    try:
        wait_for(lambda: listener._conn is not None, timeout=5, what="the LISTEN connection")
        time.sleep(0.2)
        with pg_engine.connect() as conn:
            conn.begin()
            POSTGRES.announce_work(conn)
            time.sleep(0.3)
            assert pacer.wakeups == 0  # not before the work is committed
            conn.rollback()
        time.sleep(0.3)
        assert pacer.wakeups == 0  # nor for work that never was
        with pg_engine.begin() as conn:
            POSTGRES.announce_work(conn)
            POSTGRES.announce_work(conn)
        wait_for(lambda: pacer.wakeups >= 1, timeout=2, what="the listener's wake-up")
    finally:
        started = time.monotonic()
        listener.stop()
        assert time.monotonic() - started < 2  # stopping does not wait out a timeout


def _has_started(cli: Cli, batch_id: str) -> bool:
    return _started_at(cli, batch_id) is not None


def _started_at(cli: Cli, batch_id: str) -> float | None:
    value = cli.scalar(
        f"SELECT min(started_at_epoch_ms) FROM {cli.workflow_table} WHERE workflow_uuid LIKE :p",
        p=f"req-{batch_id}-%",
    )
    return None if value is None else float(value) / 1000


@pytest.mark.slow
def test_an_idle_worker_takes_new_work_at_once(cli: Cli) -> None:
    """Well past the point where it went idle (``IDLE_AFTER_SEC``), a worker that polls
    only every ``IDLE_POLL_SEC`` (10 s) starts a newly filed batch within a second or
    two: it was woken (Postgres NOTIFY, SQLite file change), not polled."""
    users = cli.add_users(2)
    worker = cli.popen("worker")
    try:
        assert worker.stderr is not None
        while "worker started" not in worker.stderr.readline():  # up and running
            assert worker.poll() is None
        for _ in range(2):
            time.sleep(pacing.IDLE_AFTER_SEC + 1.5)
            filed_at = time.time()
            batch = cli.json(
                "batch", "2", "--user", users[0], "--user", users[1], "--detach", "--json"
            )
            batch_id = str(batch["batch_id"])
            wait_for(partial(_has_started, cli, batch_id), timeout=20, what="a start")
            started = _started_at(cli, batch_id)
            assert started is not None
            assert started - filed_at < 2.5, started - filed_at
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
    assert cli.scalar("SELECT count(*) FROM accesses") == 4


@pytest.mark.slow
def test_a_retry_falls_due_in_an_idle_process_and_starts_on_time(cli: Cli) -> None:
    """A provider asks for 4 s; by then the process has gone idle (2 s) and polls every
    10 s, yet the retry starts when due: the process woke for it."""
    user = cli.add_users(1)[0]
    with FakeProvider(fail=[(503, 1)], retry_after=4.0) as provider:
        result = cli(
            "submit",
            user,
            "--json",
            ACCESSCTL_RATE_LIMIT="50/1",
            ACCESSCTL_PROVIDER_URL=provider.url,
        )
        calls = sorted(c.arrived for c in provider.calls)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["recorded"] == 1
    assert len(calls) == 2
    assert 4.0 - 0.05 <= calls[1] - calls[0] < 6.0, calls[1] - calls[0]


def test_the_window_opens_when_the_limit_th_latest_start_leaves_it(cli: Cli) -> None:
    """``window_opens_in`` counts as DBOS's limiter counts: rate-limited starts of this
    queue in the window, on the database's clock; queued and other queues' work aside."""
    from dbos._queue import QueueRateLimit

    from accessctl.dbos_compat import window_opens_in
    from accessctl.runtime import filing_client
    from accessctl.settings import resolve_settings

    assert cli("migrate").exit_code == 0
    engine = cli.engine()
    client = filing_client(resolve_settings({"database_url": cli.database_url}), engine)
    sys_db = client._sys_db
    now_ms = sys_db._now_ms_sql()
    ws = sys_db.tables.workflow_status
    limiter: QueueRateLimit = {"limit": 3, "period": 60.0}
    queue = type("Q", (), {"name": "requests-under-test", "_limiter": limiter})()

    def start(ago_ms: int, **overrides: Any) -> None:
        row = {
            "workflow_uuid": str(uuid.uuid4()),
            "status": "SUCCESS",
            "name": "w",
            "queue_name": queue.name,
            "rate_limited": True,
            "started_at_epoch_ms": now_ms - ago_ms,
            "created_at": now_ms,
            "updated_at": now_ms,
            **overrides,
        }
        with sys_db.engine.begin() as conn:
            conn.execute(sa.insert(ws).values(**row))

    try:
        assert window_opens_in(sys_db, queue) == 0.0  # empty: room now
        start(50_000)
        start(20_000)
        start(40_000, status="ENQUEUED")  # not a start
        start(30_000, queue_name="elsewhere")  # another queue's
        start(25_000, rate_limited=False)  # not counted by the limiter
        start(61_000)  # out of the window already
        assert window_opens_in(sys_db, queue) == 0.0  # 2 of 3: room now
        start(10_000)
        # Full: room again when the 3rd latest start (50 s ago) leaves the 60-s window
        # (in 10 s, less the moments this test took since it stamped that start).
        assert 7.0 <= window_opens_in(sys_db, queue) <= 10.05
    finally:
        client.destroy()
        engine.dispose()


def test_a_worker_rides_out_a_database_fault_in_its_own_reads() -> None:
    """A worker's report read failing on a restarting database (no ping before a checkout
    any more) is a warning and another look, not the end of the worker; any other error
    still ends it."""
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from accessctl.worker import run_worker

    runtime: Any = SimpleNamespace(settings=SimpleNamespace(poll_interval=0.1))
    stop = threading.Event()
    polls: list[int] = []

    def flaky() -> None:
        polls.append(1)
        if len(polls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("the server is restarting"))
        stop.set()

    run_worker(runtime, stop, burst=False, on_poll=flaky)
    assert len(polls) == 2  # it looked again after the fault

    def broken() -> None:
        raise ValueError("not a database fault")

    with pytest.raises(ValueError):
        run_worker(runtime, threading.Event(), burst=False, on_poll=broken)

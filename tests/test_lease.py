"""Executor leases, deterministically: the adopter's grace, the owner's fence, and the
gate on DBOS's dequeuing. (Real processes and a real database restart: test_faults.py.)"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from accessctl import lease as lease_mod
from accessctl.lease import (
    LEASE_FENCE_SEC,
    Adopter,
    AdvisoryLease,
    Lease,
    gate_dequeue_on_lease,
    lease_confirmed,
)
from accessctl.logs import configure_logging
from conftest import POSTGRES_URL, punctual_starts

ME = "host-1-me"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedLease(Lease):
    """``is_free`` answers each executor's script of sightings, one value per look."""

    def __init__(self, scripts: dict[str, list[bool]]) -> None:
        super().__init__(engine=None, executor_id=ME)  # type: ignore[arg-type]
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.forgotten: list[str] = []
        self.looked: list[str] = []

    def is_free(self, other_id: str) -> bool:
        self.looked.append(other_id)
        return self.scripts[other_id].pop(0)

    def forget(self, other_id: str) -> None:
        self.forgotten.append(other_id)

    def confirmed(self) -> bool:
        return True


def adopter(lease: Lease, clock: Clock, grace: float) -> Adopter:
    return Adopter(lease, "v", limited_queue="q", period=None, grace=grace, clock=clock)


def looks(a: Adopter, clock: Clock, executors: list[str], times: list[float]) -> list[list[str]]:
    """What ``due`` answers at each of ``times`` (seconds after the first look)."""
    start = clock.now
    answers = []
    for t in times:
        clock.now = start + t
        answers.append(a.due(executors))
    return answers


def test_adopts_only_after_continuous_freedom_for_the_grace() -> None:
    clock = Clock()
    a = adopter(ScriptedLease({"b": [True] * 5}), clock, grace=5.0)
    assert looks(a, clock, ["b"], [0, 2, 4, 4.99, 5]) == [[], [], [], [], ["b"]]


def test_a_held_sighting_starts_the_grace_over() -> None:
    clock = Clock()
    script = [True, True, False, True, True, True, True]
    a = adopter(ScriptedLease({"b": script}), clock, grace=5.0)
    # Free at 0 and 2, held at 4 (the owner came back), free again from 6: due at 11,
    # not at 5 or 8.
    assert looks(a, clock, ["b"], [0, 2, 4, 6, 8, 10, 11]) == [[], [], [], [], [], [], ["b"]]


def test_each_executor_has_its_own_clock() -> None:
    clock = Clock()
    lease = ScriptedLease({"b": [True, True, True], "c": [False, True, True]})
    a = adopter(lease, clock, grace=3.0)
    assert looks(a, clock, ["b", "c"], [0, 2, 3]) == [[], [], ["b"]]
    clock.now += 2
    lease.scripts = {"b": [True], "c": [True]}
    assert a.due(["b", "c"]) == ["b", "c"]  # c: first free at 2, now 5


def test_zero_grace_adopts_at_the_first_free_sighting() -> None:
    clock = Clock()
    a = adopter(ScriptedLease({"b": [True], "c": [False]}), clock, grace=0.0)
    assert a.due(["b", "c"]) == ["b"]


def test_our_own_executor_is_never_judged() -> None:
    lease = ScriptedLease({})
    a = adopter(lease, Clock(), grace=0.0)
    assert a.due([ME]) == []
    assert lease.looked == []


def test_an_executor_with_no_pending_work_left_is_forgotten() -> None:
    clock = Clock()
    lease = ScriptedLease({"b": [True, True]})
    a = adopter(lease, clock, grace=5.0)
    assert a.due(["b"]) == []
    clock.now += 1
    assert a.due([]) == []
    assert lease.forgotten == ["b"]  # e.g. its lock, held since the free sighting, let go
    clock.now += 10
    assert a.due(["b"]) == []  # its clock starts again from this sighting


def test_a_round_that_cannot_look_starts_every_grace_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    lease = ScriptedLease({"b": [True, True]})
    a = adopter(lease, clock, grace=5.0)
    monkeypatch.setattr(lease_mod, "pending_executors", lambda engine, version: ["b"])
    assert a.adopt_once() == 0

    def unreachable(engine: Any, version: str) -> list[str]:
        raise sa.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(lease_mod, "pending_executors", unreachable)
    clock.now += 3
    with pytest.raises(sa.exc.OperationalError):
        a.adopt_once()
    monkeypatch.setattr(lease_mod, "pending_executors", lambda engine, version: ["b"])
    clock.now += 3  # 6 s after the first free sighting, 0 s after the next one
    assert a.due(["b"]) == []


# --- the owner's fence and the gate on dequeuing -------------------------------------


class FixedLease(Lease):
    def __init__(self, confirmed: bool) -> None:
        super().__init__(engine=None, executor_id=ME)  # type: ignore[arg-type]
        self._confirmed = confirmed

    def confirmed(self) -> bool:
        return self._confirmed


def test_no_lease_means_no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_mod, "_process_lease", None)
    assert not lease_confirmed()
    monkeypatch.setattr(lease_mod, "_process_lease", FixedLease(True))
    assert lease_confirmed()
    monkeypatch.setattr(lease_mod, "_process_lease", FixedLease(False))
    assert not lease_confirmed()


def test_dequeue_gate_claims_nothing_while_fenced(monkeypatch: pytest.MonkeyPatch) -> None:
    from dbos._sys_db import SystemDatabase

    claims: list[tuple[Any, ...]] = []

    def claim(self: Any, *args: Any, **kwargs: Any) -> tuple[list[str], None]:
        claims.append(args)
        return ["wf-1"], None

    monkeypatch.setattr(SystemDatabase, "start_queued_workflows", claim)
    gate_dequeue_on_lease()
    gate_dequeue_on_lease()  # idempotent: one gate, not two
    # DBOS's signature; a partition key, so that the one-statement claim under the gate
    # (claim_in_one_statement) hands the claim to the stub as DBOS's own.
    args = ("q", "executor", "version", "partition")
    monkeypatch.setattr(lease_mod, "_process_lease", FixedLease(False))
    assert SystemDatabase.start_queued_workflows(object(), *args) == ([], None)  # type: ignore[arg-type]
    assert claims == []
    monkeypatch.setattr(lease_mod, "_process_lease", FixedLease(True))
    assert SystemDatabase.start_queued_workflows(object(), *args) == (["wf-1"], None)  # type: ignore[arg-type]
    assert claims == [(*args, 0, 0)]


def test_dequeue_gate_wraps_the_method_dbos_claims_with() -> None:
    """The gate is only sound while DBOS claims through this method (dbos 3.4.0)."""
    import inspect

    from dbos import _queue

    # Unwrapped: once a run is over, DBOS's loop is wrapped by ours (pace_dbos_loops).
    source = inspect.getsource(inspect.unwrap(_queue.queue_worker_thread))
    assert source.count("start_queued_workflows(") == 2
    assert "start_queued_partitioned_workflows(" in source  # partitioned queues: unused here


# --- the Postgres lease against a real server ------------------------------------------

needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="ACCESSCTL_TEST_POSTGRES_URL not set")


@pytest.fixture
def pg_engine() -> Iterator[sa.Engine]:
    # Advisory locks on random executor IDs touch no data: the server's own database will do.
    engine = sa.create_engine(POSTGRES_URL, pool_size=4)
    try:
        yield engine
    finally:
        engine.dispose()


def new_lease(engine: sa.Engine, clock: Clock) -> AdvisoryLease:
    return AdvisoryLease(engine, f"test-{uuid.uuid4().hex}", clock=clock)


def wait_until_unlocked(engine: sa.Engine, executor_id: str) -> None:
    """A closed session's backend exits (and lets its locks go) a moment after."""
    held = sa.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
        "AND classid::bigint = ((hashtextextended(:id, 7) >> 32) & 4294967295) "
        "AND objid::bigint = (hashtextextended(:id, 7) & 4294967295)"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while conn.execute(held, {"id": executor_id}).scalar():
            assert time.monotonic() < deadline, "the closed session kept its lock"
            conn.commit()
            time.sleep(0.01)


def kill_session(engine: sa.Engine, lease: AdvisoryLease) -> None:
    """End the lease's database session, as a server restart does."""
    assert lease._conn is not None
    pid = lease._conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    lease._conn.commit()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        # Terminating only signals the backend: its locks go when it has exited.
        gone = sa.text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :p")
        deadline = time.monotonic() + 10
        while not conn.execute(gone, {"p": pid}).scalar():
            assert time.monotonic() < deadline, "the terminated backend did not exit"
            conn.commit()
            time.sleep(0.01)


@needs_postgres
def test_fence_needs_a_recent_confirmation(pg_engine: sa.Engine) -> None:
    clock = Clock()
    lease = new_lease(pg_engine, clock)
    assert not lease.confirmed()
    lease.acquire()
    try:
        assert lease.confirmed() and lease_confirmed()
        clock.now += LEASE_FENCE_SEC + 0.01  # no check for too long: fenced
        assert not lease.confirmed()
        lease.keep_alive()
        assert lease.confirmed()
        clock.now += LEASE_FENCE_SEC + 0.01  # an idle process checks seldom...
        assert not lease.confirmed()
        assert lease_confirmed()  # ...so work coming in confirms it first, on the spot
        assert lease.confirmed()
    finally:
        lease.release()
    assert not lease.confirmed() and not lease_confirmed()


@needs_postgres
def test_a_lost_session_fences_until_reacquired(pg_engine: sa.Engine) -> None:
    # Its own log stream: what the test process's logging last pointed at depends on
    # which test ran before in it.
    logged_to = io.StringIO()
    configure_logging("json", stream=logged_to)
    clock = Clock()
    owner, adopter_lease = new_lease(pg_engine, clock), new_lease(pg_engine, clock)
    owner.acquire()
    adopter_lease.acquire()
    try:
        kill_session(pg_engine, owner)
        # The adopter finds the owner's lock free and keeps it from then on.
        assert adopter_lease.is_free(owner.executor_id)
        owner.keep_alive()  # notices the loss; cannot take its lock back yet
        assert not owner.confirmed()
        assert adopter_lease.is_free(owner.executor_id)  # still free, in the adopter's hands
        owner.keep_alive()
        assert not owner.confirmed()
        adopter_lease.forget(owner.executor_id)  # adopted (or nothing left): let it go
        owner.keep_alive()
        assert owner.confirmed()
        assert not adopter_lease.is_free(owner.executor_id)
    finally:
        owner.release()
        adopter_lease.release()
    logged = logged_to.getvalue()
    assert "executor lease lost" in logged and "executor lease re-acquired" in logged


@needs_postgres
def test_a_silently_reconnected_session_is_not_taken_for_the_lease(pg_engine: sa.Engine) -> None:
    clock = Clock()
    lease, other = new_lease(pg_engine, clock), new_lease(pg_engine, clock)
    lease.acquire()
    other.acquire()
    try:
        assert lease._conn is not None
        lease._conn.invalidate()  # SQLAlchemy reconnects this on its next use, lock-less
        wait_until_unlocked(pg_engine, lease.executor_id)
        assert other.is_free(lease.executor_id)  # the server freed it with the session
        lease.keep_alive()
        assert not lease.confirmed()  # a live session is not enough: it must hold the lock
    finally:
        lease.release()
        other.release()


@needs_postgres
def test_reacquire_rides_over_a_probe_holding_the_lock(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adopter's probe of a lease takes the lock for an instant; a re-acquire that
    meets it retries within the round (here the probe lets go during the first wait)."""
    clock = Clock()
    lease = new_lease(pg_engine, clock)
    lease.acquire()
    key = {"id": lease.executor_id}
    try:
        kill_session(pg_engine, lease)
        with pg_engine.connect() as probe:
            lock = "SELECT pg_try_advisory_lock(hashtextextended(:id, 7))"
            assert probe.execute(sa.text(lock), key).scalar()
            probe.commit()
            waits: list[float] = []

            def probe_lets_go(seconds: float) -> None:
                waits.append(seconds)
                if len(waits) == 1:
                    unlock = "SELECT pg_advisory_unlock(hashtextextended(:id, 7))"
                    probe.execute(sa.text(unlock), key)
                    probe.commit()

            monkeypatch.setattr("accessctl.lease.time.sleep", probe_lets_go)
            lease.keep_alive()
            monkeypatch.undo()
        assert waits == [lease_mod.ACQUIRE_RETRY_SEC]
        assert lease.confirmed()
    finally:
        lease.release()


# --- a replaced execution (its workflow adopted elsewhere) never calls -------------------


def test_a_replaced_execution_does_not_call(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first two attempts to reach their call find another execution's token on the
    row (as after an adoption): they do not call, and their requests are called once,
    by their next try."""
    import json
    from collections import Counter

    from accessctl.testing.provider import FakeProvider

    real = lease_mod.execution_token
    replaced: list[str] = []

    def token(workflow_id: str) -> str | None:
        if len(replaced) < 2:
            replaced.append(workflow_id)
            return "another-execution"
        return real(workflow_id)

    monkeypatch.setattr(lease_mod, "execution_token", token)
    punctual_starts(monkeypatch)  # only the token decides here
    users = cli.add_users(2)
    with FakeProvider() as provider:
        result = cli(
            "batch",
            "6",
            *[a for u in users for a in ("--user", u)],
            "--json",
            ACCESSCTL_RATE_LIMIT="none",
            ACCESSCTL_PROVIDER_URL=provider.url,
        )
        calls = list(provider.calls)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["recorded"] == 6
    assert len(replaced) == 2
    assert Counter(c.key for c in calls) == Counter({k: 1 for k in {c.key for c in calls}})
    assert len(calls) == 6
    retried = cli.rows(
        f"SELECT workflow_uuid FROM {cli.workflow_table} WHERE workflow_uuid LIKE '%.t2'"
    )
    assert sorted(r[0] for r in retried) == sorted(f"{w}.t2" for w in replaced)

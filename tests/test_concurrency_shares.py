"""How live executors share the request queue's concurrency (issue #17): the split
(``dbos_compat.share_of``), who counts as live (``AdvisoryLease.peers``), what a claim
does with its share, and workers on one Postgres taking their parts for real."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from accessctl import dbos_compat, pacing
from accessctl.lease import AdvisoryLease
from accessctl.testing.provider import FakeProvider
from conftest import Cli
from test_faults import Lines, user_args, wait_for
from test_lease import Clock, kill_session, wait_until_unlocked

# --- the split ---------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 2, 4, 5, 9, 10, 11, 23, 50, 1000])
@pytest.mark.parametrize("executors", [1, 2, 3, 4, 7, 16])
def test_the_parts_sum_to_the_concurrency_and_none_is_too_small(total: int, executors: int) -> None:
    parts = [dbos_compat.share_of(total, ahead, executors) for ahead in range(executors)]
    assert sum(parts) == total
    taking = [p for p in parts if p]
    assert len(taking) == dbos_compat.share_active(total, executors)
    assert max(taking) - min(taking) <= 1
    # Each takes at least MIN_SHARE, unless one executor takes everything there is.
    assert min(taking) >= dbos_compat.MIN_SHARE or taking == [total]
    # The ones with a part come first: a standby is never ahead of one taking a part.
    assert parts == sorted(parts, reverse=True)


def test_ten_slots_go_to_two_executors_and_fifty_to_four() -> None:
    assert [dbos_compat.share_of(10, a, 4) for a in range(4)] == [5, 5, 0, 0]
    assert [dbos_compat.share_of(50, a, 4) for a in range(4)] == [13, 13, 12, 12]
    assert [dbos_compat.share_of(4, a, 2) for a in range(2)] == [4, 0]


@pytest.fixture
def shares() -> Iterator[None]:
    saved = dbos_compat.process_concurrency
    try:
        yield
    finally:
        dbos_compat.cap_process_concurrency(saved)
        dbos_compat.share_concurrency(None)


def queue_row(concurrency: int | None = 10, name: str = "access-requests") -> Any:
    return SimpleNamespace(
        name=name, _concurrency=concurrency, _worker_concurrency=concurrency, _limiter=None
    )


def test_a_share_needs_other_executors_and_an_own_cap_wins(shares: None) -> None:
    dbos_compat.cap_process_concurrency(None)
    dbos_compat.share_concurrency(None)
    assert dbos_compat.process_share(queue_row()) == (None, 0)  # SQLite: nothing known
    dbos_compat.share_concurrency(lambda: (0, 1))
    assert dbos_compat.process_share(queue_row()) == (None, 0)  # alone: all it finds
    dbos_compat.share_concurrency(lambda: (1, 2))
    assert dbos_compat.process_share(queue_row()) == (5, 2)
    assert dbos_compat.process_share(queue_row(None)) == (None, 0)  # the batch queue
    dbos_compat.cap_process_concurrency(3)  # ACCESSCTL_WORKER_CONCURRENCY: the operator's
    assert dbos_compat.process_share(queue_row()) == (3, 0)


# --- a claim and its share ------------------------------------------------------------------


@pytest.fixture
def claim_hook(monkeypatch: pytest.MonkeyPatch, shares: None) -> Any:
    """Our claim hook, around a DBOS claim that only records that it was called."""
    from dbos._sys_db import SystemDatabase

    from accessctl.lease import gate_dequeue_on_lease

    gate_dequeue_on_lease()  # in the runtime's order: the gate first, our hook around it
    dbos_compat.pace_dbos_loops()
    hook = SystemDatabase.start_queued_workflows
    inner = hook.__wrapped__  # type: ignore[attr-defined]
    calls: list[int] = []

    def recorded(self: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(queue._worker_concurrency))
        return [], None

    # The hook calls what it wrapped through its closure: swap the cell's contents.
    cell = next(c for c in hook.__closure__ or () if c.cell_contents is inner)
    monkeypatch.setattr(cell, "cell_contents", recorded)
    pacing.reset()
    sys_db = SimpleNamespace(sharded=False, _is_latest_version=lambda version: True)

    def claim(local: int, queue: Any) -> tuple[list[str], str | None]:
        return hook(sys_db, queue, "executor", "version", None, local)  # type: ignore[arg-type]

    claim.calls = calls  # type: ignore[attr-defined]
    return claim


def test_a_process_at_its_share_takes_no_claim_turn(claim_hook: Any) -> None:
    dbos_compat.share_concurrency(lambda: (0, 2))  # 5 of 10
    assert claim_hook(4, queue_row()) == ([], None)
    assert claim_hook.calls == [5]  # claimed under its share, not the row's 10
    # At its share: DBOS would find that out inside a claim transaction, behind the claim
    # lock every executor takes in turn; the hook answers without one.
    assert claim_hook(5, queue_row()) == ([], "worker_concurrency")
    assert claim_hook.calls == [5]


def test_a_standby_looks_once_a_second_and_stays_idle(claim_hook: Any) -> None:
    dbos_compat.share_concurrency(lambda: (2, 3))  # 10 slots: the first two take 5 each
    assert claim_hook(0, queue_row()) == ([], "worker_concurrency")
    assert claim_hook.calls == []
    until, freed_ends_it = pacing.pacer()._holds["access-requests"]
    assert until - pacing.pacer()._clock() > dbos_compat.STANDBY_SEC / 2
    assert not freed_ends_it
    # Nothing here for it to do: its other loops keep an idle process's pace.
    assert pacing.pacer().activities == 0


# --- who is live -------------------------------------------------------------------------


@pytest.fixture
def pg_engine(database_url: str, backend: str) -> Iterator[sa.Engine]:
    if backend != "postgres":
        pytest.skip("executors are counted on Postgres; SQLite is one host")
    # The test's own database: leases of other tests, elsewhere on the server, do not count.
    engine = sa.create_engine(database_url, pool_size=4)
    try:
        yield engine
    finally:
        engine.dispose()


def test_every_live_executor_is_counted_once_with_its_own_place(pg_engine: sa.Engine) -> None:
    leases = [AdvisoryLease(pg_engine, f"test-{uuid.uuid4().hex}") for _ in range(3)]
    try:
        for lease in leases:
            lease.acquire()
        for lease in leases:
            lease.keep_alive()
        seen = [lease.peers() for lease in leases]
        assert sorted(seen) == [(0, 3), (1, 3), (2, 3)], seen  # type: ignore[type-var]
        # An adopter holding another executor's lease does not make that one live.
        assert leases[0].is_free(f"gone-{uuid.uuid4().hex}")
        leases[0].keep_alive()
        assert leases[0].peers() == seen[0]
        # One gone (its session ends, as when its process dies): the others see two.
        kill_session(pg_engine, leases[2])
        wait_until_unlocked(pg_engine, leases[2].executor_id)
        for lease in leases[:2]:
            lease.keep_alive()
        assert sorted(lease.peers() for lease in leases[:2]) == [(0, 2), (1, 2)]  # type: ignore[type-var]
        # A lease lost (its session ended) knows nobody until it is back.
        kill_session(pg_engine, leases[0])
        leases[0].keep_alive()  # finds it lost, and re-acquires it on a new session
        assert leases[0].peers() is not None and leases[0].peers()[1] == 2  # type: ignore[index]
    finally:
        for lease in leases:
            lease.release()


def test_a_stale_count_is_refreshed_when_asked(pg_engine: sa.Engine) -> None:
    """An idle process checks its lease seldom; asking who is live after longer than
    PEERS_MAX_AGE_SEC counts anew (a standby asks at every look)."""
    from accessctl.lease import PEERS_MAX_AGE_SEC

    clock = Clock()
    first = AdvisoryLease(pg_engine, f"test-{uuid.uuid4().hex}", clock=clock)
    second = AdvisoryLease(pg_engine, f"test-{uuid.uuid4().hex}", clock=clock)
    try:
        first.acquire()
        assert first.peers() == (0, 1)
        second.acquire()
        assert first.peers() == (0, 1)  # as of its last check: fresh enough
        clock.now += PEERS_MAX_AGE_SEC + 0.01
        assert first.peers() is not None and first.peers()[1] == 2  # type: ignore[index]
    finally:
        second.release()
        first.release()


# --- workers for real ------------------------------------------------------------------------


def _executors_of(cli: Cli, batch_id: str) -> list[str]:
    rows = cli.rows(
        f"SELECT executor_id, count(*) FROM {cli.workflow_table} "
        "WHERE queue_name = 'access-requests' AND status = 'SUCCESS' "
        "AND workflow_uuid LIKE :prefix GROUP BY executor_id",
        prefix=f"req-{batch_id}-%",
    )
    return [str(executor) for executor, _ in rows]


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    return max((sum(1 for s, e in spans if s <= start < e) for start, _ in spans), default=0)


@contextlib.contextmanager
def _two_workers(
    cli: Cli, provider: FakeProvider, concurrency: int, ready: str
) -> Iterator[tuple[dict[str, str], list[Any], list[Lines]]]:
    """Two ``accessctl worker`` processes on ``provider`` at ``concurrency``, each up once
    its stderr says ``ready``: (their environment, the processes, their stderr). Stopped
    (SIGTERM) at the end, whichever of them is still there."""
    if not cli.database_url.startswith("postgresql"):
        pytest.skip("executors are counted on Postgres")
    env = {
        "ACCESSCTL_RATE_LIMIT": "none",
        "ACCESSCTL_CONCURRENCY": str(concurrency),
        "ACCESSCTL_PROVIDER_URL": provider.url,
        "ACCESSCTL_PROVIDER_TIMEOUT": "2",
        "ACCESSCTL_LOG_FORMAT": "json",
    }
    workers = [cli.popen("worker", **env) for _ in range(2)]
    logs = [Lines(w) for w in workers]
    try:
        for log in logs:
            wait_for(functools.partial(log.has, ready), what=f"a worker's {ready!r}")
        yield env, workers, logs
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.communicate(timeout=60)


def _file(cli: Cli, env: dict[str, str], n: int) -> str:
    """``batch N --detach`` for two new users: the batch's ID."""
    filed = cli("batch", str(n), *user_args(cli.add_users(2)), "--detach", **env)
    assert filed.exit_code == 0, filed.stderr
    return filed.stdout.strip()


def _when_done(cli: Cli, batch_id: str) -> dict[str, Any]:
    def status() -> dict[str, Any]:
        return dict(cli.json("status", batch_id, "--json"))

    wait_for(lambda: status()["state"] == "done", timeout=90, what="the batch done")
    return status()


@pytest.mark.slow
def test_a_standby_worker_takes_over_when_the_one_with_the_share_dies(cli: Cli) -> None:
    """Concurrency 4 is too little to split: of two workers, one takes it all and the
    other stands by (and says so). Killing the first (-9) hands the work to the second:
    every request recorded once, never more than 4 calls at once."""
    with FakeProvider(delay=0.3) as provider:
        with _two_workers(cli, provider, 4, "worker started") as (env, workers, logs):
            batch_id = _file(cli, env, 24)
            done = functools.partial(_executors_of, cli, batch_id)
            wait_for(lambda: len(done()) >= 1, what="the first requests done")
            (active,) = done()  # one executor runs them all
            pid = int(active.rsplit("-", 2)[1])
            (standby,) = [i for i, w in enumerate(workers) if w.pid != pid]
            wait_for(
                functools.partial(logs[standby].has, "standing by"), what="the standby's line"
            )
            workers[1 - standby].send_signal(signal.SIGKILL)
            status = _when_done(cli, batch_id)
        calls = [(c.arrived, c.finished) for c in provider.calls]
    assert (status["recorded"], status["failed"]) == (24, 0)
    assert cli.scalar("SELECT count(*) FROM accesses") == 24
    assert len(done()) == 2  # the standby took over
    assert _most_at_once(calls) <= 4


@pytest.mark.slow
def test_two_workers_each_take_their_half(cli: Cli) -> None:
    """Concurrency 10 splits into two parts of 5: both workers run requests, neither more
    than 5 at once, and the provider never sees more than 10."""
    with FakeProvider(delay=0.3) as provider:
        with _two_workers(cli, provider, 10, "concurrency share") as (env, _, logs):
            batch_id = _file(cli, env, 40)
            status = _when_done(cli, batch_id)
        calls = [(c.arrived, c.finished) for c in provider.calls]
    assert status["recorded"] == 40
    assert len(_executors_of(cli, batch_id)) == 2
    assert _most_at_once(calls) <= 10
    for log in logs:  # each told its part (and, stopping, maybe its whole once alone)
        told = [json.loads(line) for line in log.lines if "concurrency share" in line]
        assert (5, 10, 2) in {(t["share"], t["concurrency"], t["executors"]) for t in told}
        assert all(t["share"] == 5 for t in told if t["executors"] == 2), told
    # Per worker: never more than its 5 at once (DBOS's own start and end times).
    rows = cli.rows(
        f"SELECT executor_id, started_at_epoch_ms, updated_at FROM {cli.workflow_table} "
        "WHERE queue_name = 'access-requests' AND workflow_uuid LIKE :prefix",
        prefix=f"req-{batch_id}-%",
    )
    for executor in {r[0] for r in rows}:
        spans = [(float(r[1]), float(r[2])) for r in rows if r[0] == executor]
        assert _most_at_once(spans) <= 5, executor

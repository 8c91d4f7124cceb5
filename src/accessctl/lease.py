"""Executor leases: who may execute, and whose pending work may be adopted.

The policy (docs/operations.md, "Executors and leases"):

* Every executing process (``submit``, ``batch``, ``worker``) runs under its own executor
  ID, ``HOST-PID-RANDOM``, never reused, and holds a lease on it for its lifetime: a
  Postgres session advisory lock, or an ``flock`` on a file beside the SQLite database.
  The operating system or the database server frees the lease when the process dies,
  however it dies.
* DBOS only ever runs a workflow under one executor ID at a time. Pending work whose
  executor's lease has stayed free for the adoption grace belongs to a dead process: any
  live executor adopts it (DBOS re-enqueues it, so it starts again through the
  rate-limited queue) and checks again every few seconds. Work is never left stranded,
  and no two live processes run it.
* A Postgres lease can also be lost by a live process: a database restart or a severed
  connection ends its session. Such a process is *fenced*: from the moment its lease is
  not confirmed within ``LEASE_FENCE_SEC`` it claims nothing from the queues and calls no
  provider, until it has re-acquired the lease. Adopters wait out a grace longer than that
  fence plus the longest provider call (``adoption_grace``), so a call the owner started
  before it noticed the loss has ended before anyone else may start the same request.
* Read-only commands (``errors``, ``status``, ``config``) hold no lease and adopt nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from accessctl.backend import PostgresBackend
from accessctl.db import dbos_table, is_sqlite_url, sqlite_path

if TYPE_CHECKING:
    import sqlalchemy as sa

log = structlog.get_logger(__name__)

# How often a process confirms that it still holds its lease (and re-acquires it if not).
LEASE_CHECK_SEC = 1.0
# A process starts work (claims from a queue, calls the provider) only while its lease was
# confirmed this recently: three checks, so a busy host that delays one check does not
# fence a healthy process, while a lost lease stops new work within this bound.
LEASE_FENCE_SEC = 3.0
# A failed re-acquire is tried again this many times per round, this far apart: another
# process's adopter takes our lock for an instant whenever it probes whether it is free.
ACQUIRE_TRIES = 3
# Who is live (``peers``) is refreshed on demand once the last check is this old.
PEERS_MAX_AGE_SEC = 1.5
# An on-demand confirmation (``confirm_now``) is tried at most this often.
CONFIRM_RETRY_SEC = 0.5
ACQUIRE_RETRY_SEC = 0.05


def new_executor_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# The lease this process executes under; the fence (``lease_confirmed``) reads it.
_process_lease: Lease | None = None


def lease_confirmed() -> bool:
    """Whether this process may start work now: it holds an executor lease, confirmed
    within ``LEASE_FENCE_SEC``. False with no lease (before acquire, after release): a
    straggling thread of a process that has let its lease go must not call anyone.

    An idle process confirms its lease only every ``pacing.IDLE_POLL_SEC``; when work
    comes, the first look here confirms it on the spot (one query) before any start."""
    lease = _process_lease
    if lease is None:
        return False
    if not lease.confirmed():
        lease.confirm_now()
    return lease.confirmed()


class Lease:
    """A lease on our executor ID, and the test of whether another executor's is free."""

    def __init__(self, engine: sa.Engine, executor_id: str) -> None:
        self.engine = engine
        self.executor_id = executor_id
        self._last_on_demand = -CONFIRM_RETRY_SEC

    def acquire(self) -> None:
        raise NotImplementedError

    def confirmed(self) -> bool:
        """Whether we hold our lease, as far as we checked recently enough to start work."""
        raise NotImplementedError

    def is_free(self, other_id: str) -> bool:
        raise NotImplementedError

    def forget(self, other_id: str) -> None:
        """Called once ``other_id``'s work is adopted, or it has none left."""

    def release(self) -> None:
        raise NotImplementedError

    def keep_alive(self) -> None:
        """Confirm the lease, or re-acquire it if it was lost (e.g. the database restarted)."""

    def confirm_now(self) -> None:
        """An unconfirmed lease is about to be relied on: check it now (not more than
        every ``CONFIRM_RETRY_SEC``, so a fenced process does not hammer the database)."""
        now = time.monotonic()
        if now - self._last_on_demand < CONFIRM_RETRY_SEC:
            return
        self._last_on_demand = now
        self.keep_alive()

    def adoption_grace(self, call_timeout: float | None) -> float:
        """How long another executor's lease must stay free before its work is adopted."""
        raise NotImplementedError

    def peers(self) -> tuple[int, int] | None:
        """(how many live executors come before this one, how many there are), as of the
        last check; None where unknown. Executors share the queue's concurrency by it."""
        return None

    def _register(self) -> None:
        global _process_lease
        _process_lease = self

    def _unregister(self) -> None:
        global _process_lease
        if _process_lease is self:
            _process_lease = None


class FileLease(Lease):
    """SQLite: ``flock`` on ``<database>.executors/<executor id>.lease``. SQLite is shared
    only by processes on one host, and ``flock`` dies with its process."""

    def __init__(self, engine: sa.Engine, executor_id: str) -> None:
        super().__init__(engine, executor_id)
        url = engine.url.render_as_string(hide_password=False)
        self.directory = Path(f"{sqlite_path(url)}.executors")
        self._fd: int | None = None

    def _path(self, executor_id: str) -> Path:
        return self.directory / f"{re.sub(r'[^A-Za-z0-9._-]', '_', executor_id)}.lease"

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(self.executor_id), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd
        self._register()

    def confirmed(self) -> bool:
        # The kernel holds an flock for as long as the descriptor is open: nothing but
        # this process's own release (or death) can take it away.
        return self._fd is not None

    def adoption_grace(self, call_timeout: float | None) -> float:
        # A free flock is proof that its process is dead (same host, no server between):
        # there is no live owner to wait out.
        return 0.0

    def is_free(self, other_id: str) -> bool:
        try:
            fd = os.open(self._path(other_id), os.O_RDWR)
        except FileNotFoundError:
            return True  # never leased by accessctl (or already adopted): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops the lock we may have taken
        return True

    def forget(self, other_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(other_id).unlink()

    def release(self) -> None:
        self._unregister()
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(self.executor_id).unlink()
            os.close(self._fd)
            self._fd = None


class AdvisoryLease(Lease):
    """Postgres: a session advisory lock keyed by the executor ID, on a connection held
    for the process's lifetime. The server frees it when the session ends, which a
    database restart or a severed connection does to a live process too: hence the
    fence (``confirmed``) and the adopter's grace.

    When it finds another executor's lock free, it keeps that lock (on our lease
    connection) until it has adopted the work or the work is gone. A free sighting is
    therefore continuous by construction: the owner cannot come back between two
    sightings, start work unseen and lose its lease again."""

    _KEY = PostgresBackend.ADVISORY_KEY
    # Whether this session holds the advisory lock on :id, and the live executors (their
    # presence locks): how many, and how many of them have a lower server PID than ours.
    _CHECK = (
        "SELECT count(*) FILTER (WHERE "
        f"{PostgresBackend.ADVISORY_LOCK_OF_ID} AND pid = pg_backend_pid()), "
        f"count(*) FILTER (WHERE {PostgresBackend.PRESENCE_LOCK}), "
        f"count(*) FILTER (WHERE {PostgresBackend.PRESENCE_LOCK} AND pid < pg_backend_pid()) "
        "FROM pg_locks"
    )
    _PRESENT = "SELECT pg_try_advisory_lock_shared({}, {})".format(*PostgresBackend.PRESENCE_KEY)

    def __init__(
        self,
        engine: sa.Engine,
        executor_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(engine, executor_id)
        self._conn: sa.Connection | None = None
        self._lock = threading.Lock()
        self._clock = clock
        self._confirmed_at: float | None = None
        self._lost_at: float | None = None
        self._held_others: set[str] = set()  # other executors' locks we are holding
        self._peers: tuple[int, int] | None = None

    def _try_lock(self, conn: sa.Connection, executor_id: str) -> bool:
        import sqlalchemy as sa

        got = conn.execute(
            sa.text(f"SELECT pg_try_advisory_lock({self._KEY})"), {"id": executor_id}
        ).scalar()
        conn.commit()
        return bool(got)

    def _lock_on_new_session(self) -> bool:
        """Open the lease connection and take our lock on it (caller holds ``_lock``)."""
        conn = self.engine.connect()
        try:
            for attempt in range(ACQUIRE_TRIES):
                if self._try_lock(conn, self.executor_id):
                    # Shared, so it never waits; counted by every executor's check.
                    conn.exec_driver_sql(self._PRESENT)
                    self._check(conn)
                    self._conn = conn
                    self._confirmed_at = self._clock()
                    return True
                if attempt + 1 < ACQUIRE_TRIES:
                    time.sleep(ACQUIRE_RETRY_SEC)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        conn.close()
        return False

    def _check(self, conn: sa.Connection) -> bool:
        """Whether ``conn``'s session holds our lock; counts the live executors too."""
        import sqlalchemy as sa

        held, executors, ahead = conn.execute(sa.text(self._CHECK), {"id": self.executor_id}).one()
        conn.commit()
        self._peers = (int(ahead), int(executors)) if executors else None
        return bool(held)

    def _lose(self, reason: str) -> None:
        """Our session, and every lock on it, is gone (caller holds ``_lock``): fenced from
        now until ``keep_alive`` re-acquires the lease."""
        self._drop()
        self._lost_at = self._clock()
        log.warning(
            "executor lease lost; starting no work until it is re-acquired",
            executor=self.executor_id,
            reason=reason,
        )

    def _drop(self) -> None:
        """Forget the lease connection (caller holds ``_lock``). Invalidated, so that the
        pool never hands a session without our lock back to anyone as if it had it."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
        self._confirmed_at = None
        self._peers = None
        self._held_others.clear()

    def acquire(self) -> None:
        with self._lock:
            if not self._lock_on_new_session():
                raise RuntimeError(f"executor ID {self.executor_id} is leased by another process")
        self._register()

    def confirmed(self) -> bool:
        at = self._confirmed_at
        return at is not None and self._clock() - at <= LEASE_FENCE_SEC

    def adoption_grace(self, call_timeout: float | None) -> float:
        # The owner stops starting calls within LEASE_FENCE_SEC of losing its lease; a
        # call it started just before may last the provider's timeout; two more checks
        # leave it time to checkpoint that call's answer. Only then may another process
        # start the request again. (It covers re-acquiring too: the owner retries every
        # LEASE_CHECK_SEC.)
        return LEASE_FENCE_SEC + (call_timeout or 0.0) + 2 * LEASE_CHECK_SEC

    def keep_alive(self) -> None:
        with self._lock:
            if self._conn is not None:
                reason = "lock not held by our session"
                try:
                    # Not just "SELECT 1": SQLAlchemy silently reconnects an invalidated
                    # connection on its next use, and a new session holds no lock.
                    if self._check(self._conn):
                        self._confirmed_at = self._clock()
                        return
                except Exception as exc:
                    reason = type(exc).__name__
                self._lose(reason)
            try:
                got = self._lock_on_new_session()
            except Exception as exc:  # the database is still away: next round
                log.debug("executor lease not re-acquired", error=type(exc).__name__)
                return
            if not got:
                # Another process's adopter holds it: it judged us dead, and releases it
                # once it has adopted our pending work. Until then we stay fenced.
                log.debug("executor lease held by another process; retrying")
                return
            lost_for = self._clock() - self._lost_at if self._lost_at is not None else 0.0
            self._lost_at = None
        log.warning(
            "executor lease re-acquired; starting work again",
            executor=self.executor_id,
            lost_for_sec=round(lost_for, 1),
        )
        from accessctl.pacing import pacer

        pacer().wake()  # whatever waited for the lease starts now

    def peers(self) -> tuple[int, int] | None:
        at = self._confirmed_at
        if at is None or self._clock() - at > PEERS_MAX_AGE_SEC:
            # An idle process checks its lease seldom; a standby asks every second or so
            # (dbos_compat.STANDBY_SEC) whether one with a part has gone.
            try:
                self.confirm_now()
            except Exception as exc:  # keep_alive handles database faults; never fail a claim
                log.debug("executor count not refreshed", error=type(exc).__name__)
        return self._peers if self.confirmed() else None

    def is_free(self, other_id: str) -> bool:
        if not self.confirmed():
            self.confirm_now()  # an idle process confirms its lease only now and then
        with self._lock:
            if self._conn is None or not self.confirmed():
                return False  # without our own lease we judge nobody
            if other_id in self._held_others:
                return True  # ours since we first saw it free: it has stayed free
            try:
                got = self._try_lock(self._conn, other_id)
            except Exception as exc:
                self._lose(type(exc).__name__)  # our session, and the locks it held
                raise
            if got:
                self._held_others.add(other_id)
            return got

    def forget(self, other_id: str) -> None:
        import sqlalchemy as sa

        with self._lock:
            if other_id not in self._held_others or self._conn is None:
                return
            self._held_others.discard(other_id)
            try:
                self._conn.execute(
                    sa.text(f"SELECT pg_advisory_unlock({self._KEY})"), {"id": other_id}
                )
                self._conn.commit()
            except Exception as exc:
                self._lose(type(exc).__name__)

    def release(self) -> None:
        self._unregister()
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._conn = None
            self._confirmed_at = None
            self._peers = None
            self._held_others.clear()


def executors_alive(engine: sa.Engine, executor_ids: set[str]) -> dict[str, bool]:
    """Whether each executor still holds its lease (read-only: nothing is taken or
    adopted)."""
    import sqlalchemy as sa

    if not executor_ids:
        return {}
    if is_sqlite_url(engine.url.render_as_string(hide_password=False)):
        probe = FileLease(engine, "accessctl-reader")
        return {e: not probe.is_free(e) for e in executor_ids}
    stmt = sa.text(f"SELECT count(*) FROM pg_locks WHERE {PostgresBackend.ADVISORY_LOCK_OF_ID}")
    with engine.connect() as conn:
        return {e: bool(conn.execute(stmt, {"id": e}).scalar()) for e in executor_ids}


def any_executor_alive(engine: sa.Engine) -> bool:
    """Whether any executing process holds its lease on this database now (read-only).
    Postgres: an executor's presence lock; SQLite: a held ``flock`` among the lease
    files."""
    import sqlalchemy as sa

    if is_sqlite_url(engine.url.render_as_string(hide_password=False)):
        probe = FileLease(engine, "accessctl-reader")
        if not probe.directory.is_dir():
            return False
        return any(not probe.is_free(path.stem) for path in probe.directory.glob("*.lease"))
    with engine.connect() as conn:
        held = conn.execute(
            sa.text(f"SELECT count(*) FROM pg_locks WHERE {PostgresBackend.PRESENCE_LOCK}")
        ).scalar()
    return bool(held)


def make_lease(engine: sa.Engine, executor_id: str) -> Lease:
    url = engine.url.render_as_string(hide_password=False)
    return (
        FileLease(engine, executor_id) if is_sqlite_url(url) else AdvisoryLease(engine, executor_id)
    )


def gate_dequeue_on_lease() -> None:
    """Make DBOS's queue threads claim nothing while this process's lease is not confirmed
    (dbos_compat.gate_dequeue): a fenced process spends no limiter slot on work it may not
    do. The provider-call fence in ``workflows.call_provider_step`` is what keeps calls
    exactly once. Proven by tests/test_lease.py (``test_dequeue_gate_*``) and, against a
    real database restart, tests/test_faults.py::test_database_restart_runs_every_request_once."""
    from accessctl.dbos_compat import gate_dequeue

    gate_dequeue(lease_confirmed)


def execution_token(workflow_id: str) -> str | None:
    """The ownership token of this thread's execution of ``workflow_id``
    (dbos_compat.execution_token): an execution whose token is no longer on the row has
    been replaced, e.g. adopted while this process had lost its lease."""
    from accessctl.dbos_compat import execution_token as token

    return token(workflow_id)


def pending_executors(engine: sa.Engine, app_version: str) -> list[str]:
    """Executor IDs that own PENDING workflows of this application version."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT DISTINCT executor_id FROM {dbos_table(engine)} "
                "WHERE status = 'PENDING' AND application_version = :v"
            ),
            {"v": app_version},
        )
        return [str(r[0]) for r in rows if r[0] is not None]


class Adopter:
    """Adopts the pending work of dead executors: every ``interval`` s it looks at each
    executor with pending work, and adopts it once that executor's lease has been free at
    every look for at least ``grace`` s (any look that finds it held starts over). A
    second thread confirms our own lease every ``LEASE_CHECK_SEC`` s (``keep_alive``).

    A request that was running when its process died may already have called downstream,
    and DBOS clears its start time when it re-enqueues it. Re-enqueuing it only once that
    start has left the limiter's window keeps the crashed attempt counted: no window ever
    holds more than L starts, crashed ones included."""

    def __init__(
        self,
        lease: Lease,
        app_version: str,
        *,
        limited_queue: str,
        period: float | None,
        interval: float = 2.0,
        grace: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.app_version = app_version
        self.limited_queue = limited_queue
        self.period_ms = int(period * 1000) if period else 0
        self.interval = min(interval, period) if period else interval
        self.grace = grace
        self._clock = clock
        self._free_since: dict[str, float] = {}  # executor -> first of its unbroken free looks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="accessctl-adopter", daemon=True)
        self._keeper = threading.Thread(target=self._keep, name="accessctl-lease", daemon=True)

    def due(self, executor_ids: list[str]) -> list[str]:
        """Of the executors with pending work, those whose lease has now been free at every
        look for ``grace`` s. Executors no longer pending are forgotten."""
        now = self._clock()
        pending = set(executor_ids)
        for gone in [e for e in self._free_since if e not in pending]:
            del self._free_since[gone]
            self.lease.forget(gone)
        ready = []
        for executor_id in executor_ids:
            if executor_id == self.lease.executor_id:
                continue
            if not self.lease.is_free(executor_id):
                if self._free_since.pop(executor_id, None) is not None:
                    log.info(
                        "executor lease held again; its work stays with it", executor=executor_id
                    )
                continue
            first = self._free_since.setdefault(executor_id, now)
            if now - first >= self.grace:
                ready.append(executor_id)
            elif first == now:
                log.info(
                    "executor lease free; adopting its work after the grace unless it returns",
                    executor=executor_id,
                    grace_sec=self.grace,
                )
        return ready

    def _orphans(self, executor_id: str) -> tuple[list[str], int]:
        """The dead executor's workflows ready to re-enqueue, and how many must wait."""
        import sqlalchemy as sa

        engine = self.lease.engine
        now = (
            "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"
            if engine.dialect.name == "postgresql"
            else ":py_now"
        )
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"SELECT workflow_uuid, queue_name = :q AND started_at_epoch_ms IS NOT NULL "
                    f"AND started_at_epoch_ms > {now} - :period AS in_window "
                    f"FROM {dbos_table(engine)} WHERE status = 'PENDING' "
                    "AND executor_id = :e AND application_version = :v"
                ),
                {
                    "q": self.limited_queue,
                    "period": self.period_ms,
                    "e": executor_id,
                    "v": self.app_version,
                    "py_now": int(time.time() * 1000),
                },
            ).all()
        ready = [str(r[0]) for r in rows if not r[1]]
        return ready, len(rows) - len(ready)

    def adopt_once(self) -> int:
        try:
            due = self.due(pending_executors(self.lease.engine, self.app_version))
        except Exception:
            # We could not look: nobody has been seen free without a break any more.
            self._free_since.clear()
            raise
        if not due:
            return 0
        from accessctl.dbos_compat import requeue_for_adoption

        adopted = 0
        for executor_id in due:
            ready, waiting = self._orphans(executor_id)
            for workflow_id in ready:
                # What DBOS's own recovery does: back to its queue, restarted through it.
                requeue_for_adoption(workflow_id, executor_id)
            if ready:
                from accessctl.pacing import pacer

                pacer().wake()
            if not waiting:
                self._free_since.pop(executor_id, None)
                self.lease.forget(executor_id)
            if ready:
                log.info(
                    "adopted work of a dead executor",
                    executor=executor_id,
                    workflows=len(ready),
                    waiting_for_window=waiting,
                )
            adopted += len(ready)
        return adopted

    def start(self) -> None:
        self._keeper.start()
        self.adopt_once()
        self._thread.start()

    def _keep(self) -> None:
        # The first check at once: launching DBOS since the acquire may have taken longer
        # than the fence, and until a check confirms the lease nothing is dequeued.
        from accessctl.pacing import pacer

        while True:
            try:
                self.lease.keep_alive()
            except Exception as exc:  # keep_alive handles database faults; never die here
                self._report("executor lease check failed", exc)
            # Idle, it checks seldom: work coming in confirms it first (lease_confirmed).
            if pacer().wait(self._stop, LEASE_CHECK_SEC, "lease"):
                return

    def _run(self) -> None:
        from accessctl.pacing import pacer

        while True:
            # An executor seen free is looked at on time until the grace is over.
            if self._free_since:
                if self._stop.wait(self.interval):
                    return
            elif pacer().wait(self._stop, self.interval, "adopter"):
                return
            try:
                self.adopt_once()
            except Exception as exc:  # a passing database fault: try again next round
                self._report("adoption round failed", exc)

    def _report(self, event: str, exc: Exception) -> None:
        """A database fault passes (a warning); anything else may be DBOS drift, so it is
        an error with its traceback: it must be seen, not retried in silence."""
        from sqlalchemy.exc import DBAPIError

        from accessctl.db import describe_db_error

        detail = describe_db_error(exc, url=self.lease.engine.url)[:300]
        if isinstance(exc, (DBAPIError, OSError)):
            log.warning(event, error=type(exc).__name__, detail=detail)
        else:
            log.error(event, error=type(exc).__name__, detail=detail, exc_info=exc)

    def stop(self) -> None:
        from accessctl.pacing import pacer

        self._stop.set()
        pacer().wake()  # its paced waits see the stop now
        for thread in (self._thread, self._keeper):
            if thread.is_alive():
                thread.join(timeout=self.interval + 5)

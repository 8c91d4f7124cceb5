"""Executor leases: who may execute, and whose pending work may be adopted.

The policy (docs/operations.md, "Executors"):

* Every executing process (``submit``, ``batch``, ``worker``) runs under its own executor
  ID, ``HOST-PID-RANDOM``, never reused, and holds a lease on it for its lifetime: a
  Postgres session advisory lock, or an ``flock`` on a file beside the SQLite database.
  The operating system or the database server frees the lease when the process dies,
  however it dies.
* DBOS only ever runs a workflow under one executor ID at a time. Pending work whose
  executor's lease is free belongs to a dead process: any live executor adopts it (DBOS
  re-enqueues it, so it starts again through the rate-limited queue) at launch and every
  few seconds after. Work is never left stranded, and no two live processes run it.
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
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from accessctl.db import dbos_table, is_sqlite_url, sqlite_path

if TYPE_CHECKING:
    import sqlalchemy as sa

log = structlog.get_logger(__name__)


def new_executor_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Lease:
    """A lease on our executor ID, and the test of whether another executor's is free."""

    def __init__(self, engine: sa.Engine, executor_id: str) -> None:
        self.engine = engine
        self.executor_id = executor_id

    def acquire(self) -> None:
        raise NotImplementedError

    def is_free(self, other_id: str) -> bool:
        raise NotImplementedError

    def forget(self, other_id: str) -> None:
        """Called after adopting ``other_id``'s work."""

    def release(self) -> None:
        raise NotImplementedError

    def keep_alive(self) -> None:
        """Re-acquire the lease if it was lost (e.g. the database restarted)."""


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
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(self.executor_id).unlink()
            os.close(self._fd)
            self._fd = None


class AdvisoryLease(Lease):
    """Postgres: a session advisory lock keyed by the executor ID, on a connection held
    for the process's lifetime. The server frees it when the session ends."""

    _KEY = "hashtextextended(:id, 7)"

    def __init__(self, engine: sa.Engine, executor_id: str) -> None:
        super().__init__(engine, executor_id)
        self._conn: sa.Connection | None = None
        self._lock = threading.Lock()

    def _try_lock(self, conn: sa.Connection, executor_id: str) -> bool:
        import sqlalchemy as sa

        got = conn.execute(
            sa.text(f"SELECT pg_try_advisory_lock({self._KEY})"), {"id": executor_id}
        ).scalar()
        conn.commit()
        return bool(got)

    def acquire(self) -> None:
        with self._lock:
            conn = self.engine.connect()
            if not self._try_lock(conn, self.executor_id):
                conn.close()
                raise RuntimeError(f"executor ID {self.executor_id} is leased by another process")
            self._conn = conn

    def keep_alive(self) -> None:
        import sqlalchemy as sa
        from sqlalchemy.exc import DBAPIError

        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(sa.text("SELECT 1"))
                    self._conn.commit()
                    return
                except DBAPIError:
                    with contextlib.suppress(Exception):
                        self._conn.invalidate()
                        self._conn.close()
                    self._conn = None
                    log.warning("executor lease lost; re-acquiring", executor=self.executor_id)
        with contextlib.suppress(DBAPIError):
            self.acquire()

    def is_free(self, other_id: str) -> bool:
        import sqlalchemy as sa

        with self._lock:
            if self._conn is None:
                return False  # without our own lease we judge nobody
            if not self._try_lock(self._conn, other_id):
                return False
            self._conn.execute(sa.text(f"SELECT pg_advisory_unlock({self._KEY})"), {"id": other_id})
            self._conn.commit()
            return True

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None


def make_lease(engine: sa.Engine, executor_id: str) -> Lease:
    url = engine.url.render_as_string(hide_password=False)
    return (
        FileLease(engine, executor_id) if is_sqlite_url(url) else AdvisoryLease(engine, executor_id)
    )


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
    """Adopts the pending work of dead executors, at start and every ``interval`` s.

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
    ) -> None:
        self.lease = lease
        self.app_version = app_version
        self.limited_queue = limited_queue
        self.period_ms = int(period * 1000) if period else 0
        self.interval = min(interval, period) if period else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="accessctl-adopter", daemon=True)

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
        from dbos._dbos import _get_dbos_instance
        from dbos._recovery import _recover_workflow
        from dbos._sys_db import GetPendingWorkflowsOutput

        dbos = _get_dbos_instance()
        adopted = 0
        for executor_id in pending_executors(self.lease.engine, self.app_version):
            if executor_id == self.lease.executor_id or not self.lease.is_free(executor_id):
                continue
            ready, waiting = self._orphans(executor_id)
            for workflow_id in ready:
                # What DBOS's own recovery does: back to its queue, restarted through it.
                _recover_workflow(
                    dbos, GetPendingWorkflowsOutput(workflow_id=workflow_id), [executor_id]
                )
            if not waiting:
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
        self.adopt_once()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lease.keep_alive()
                self.adopt_once()
            except Exception as exc:  # a passing database fault: try again next round
                log.warning("adoption round failed", error=type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)

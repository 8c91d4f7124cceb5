"""What differs between SQLite and PostgreSQL in accessctl's own SQL, in one place.

``for_engine(engine)`` gives the backend of an engine or connection:

- ``dbos_table``: DBOS's system tables live in the ``dbos`` schema on Postgres, bare in
  the SQLite file.
- ``begin_write``: a transaction that reads before it writes takes SQLite's write lock
  first (``BEGIN IMMEDIATE``): otherwise it fails, instead of waiting, when another
  writer got in between. Postgres needs nothing.
- ``announce_work``: tell idle executors, committed with the work, that there is new
  work (Postgres ``NOTIFY``; SQLite executors see the database file change instead).
- ``single_statement_requests``: a request's usual read (before its provider call) and
  write (its row) are single autocommit statements on Postgres, where a transaction costs
  two round trips of its own and one statement can carry lookups and an insert
  (data-modifying CTEs); SQLite has neither the cost nor the CTEs (workflows.py).
- ``refill_freed_slots``: a busy queue claims again as soon as one of this process's
  requests ends (pacing.py). On Postgres a claim is a short transaction and the slots
  otherwise sat empty until the next poll; on SQLite a claim takes the database's one
  write lock and the worker is CPU-bound already, so it measured no faster.
- ``ADVISORY_LOCK_OF_ID`` (Postgres): the ``pg_locks`` predicate of the session advisory
  lock keyed by an executor ID, as the lease takes it and readers probe it.

The clocks used in raw SQL (workflows' attempt state, the adopter's window) stay where they
are: each one is a deliberate choice for its query (statement vs transaction time, the
database's clock vs Python's), not one expression written twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import sqlalchemy as sa


class _HasDialect(Protocol):
    @property
    def dialect(self) -> sa.Dialect: ...


class Backend:
    name = ""
    is_sqlite = False
    single_statement_requests = False
    refill_freed_slots = False

    def dbos_table(self, name: str = "workflow_status") -> str:
        """A DBOS system table as raw SQL names it."""
        raise NotImplementedError

    def begin_write(self, conn: sa.Connection) -> None:
        """Call first in a transaction that reads before it writes."""

    def announce_work(self, conn: sa.Connection) -> None:
        """Call in a transaction that queues work: idle executors wake when it commits."""


class SQLiteBackend(Backend):
    name = "sqlite"
    is_sqlite = True

    def dbos_table(self, name: str = "workflow_status") -> str:
        return name

    def begin_write(self, conn: sa.Connection) -> None:
        # pysqlite begins no transaction before the first write (nor for DDL at all):
        # take the write lock now, so a concurrent writer waits instead of racing.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class PostgresBackend(Backend):
    name = "postgresql"
    single_statement_requests = True
    refill_freed_slots = True

    # The advisory lock key of an executor ID (bind ``:id``): a bigint, which pg_locks
    # shows as classid = its high 32 bits, objid = its low 32 bits, objsubid = 1.
    ADVISORY_KEY = "hashtextextended(:id, 7)"
    ADVISORY_LOCK_OF_ID = (
        "locktype = 'advisory' AND granted AND objsubid = 1 "
        f"AND classid::bigint = (({ADVISORY_KEY} >> 32) & 4294967295) "
        f"AND objid::bigint = ({ADVISORY_KEY} & 4294967295)"
    )

    # Every executing process also holds this shared advisory lock (two int4 keys, so
    # pg_locks shows objsubid = 2, unlike any lease) on its lease session: counting its
    # holders counts the live executors, who share the queue's concurrency between them.
    PRESENCE_KEY = (0x61636365, 0x78656373)  # "acce", "xecs"
    PRESENCE_LOCK = (
        "locktype = 'advisory' AND granted AND objsubid = 2 "
        f"AND classid = {PRESENCE_KEY[0]} AND objid = {PRESENCE_KEY[1]} "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )

    # The channel new work is announced on (pacing.WorkListener listens).
    WORK_CHANNEL = "accessctl_work"

    def dbos_table(self, name: str = "workflow_status") -> str:
        return f"dbos.{name}"

    def announce_work(self, conn: sa.Connection) -> None:
        # Delivered at commit, once per transaction however often it is sent.
        conn.exec_driver_sql(f"SELECT pg_notify('{self.WORK_CHANNEL}', '')")


SQLITE = SQLiteBackend()
POSTGRES = PostgresBackend()


def for_engine(bind: _HasDialect) -> Backend:
    """The backend of an engine or connection (anything not SQLite is Postgres)."""
    return SQLITE if bind.dialect.name == "sqlite" else POSTGRES

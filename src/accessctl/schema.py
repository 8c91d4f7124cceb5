"""Schema management: Alembic for the application tables, DBOS's own migrations for its
system tables, both under one lock so that concurrent ``accessctl migrate`` runs are safe.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from accessctl.backend import for_engine
from accessctl.db import describe_db_error, hide_password, normalize_url
from accessctl.exceptions import DatabaseUnreachable, SchemaNotMigrated

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

log = structlog.get_logger(__name__)

# Any constant that no other application uses as an advisory lock key on the same database.
MIGRATION_LOCK_KEY = 0x616363657373  # "access"
MIGRATION_LOCK_POLL_SEC = 0.2


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package (a wheel), or at the
    top of a source checkout."""
    packaged = Path(__file__).parent / "migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise RuntimeError("accessctl's Alembic migrations are missing from this installation")


def _alembic_config(connection: sa.Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# The newest migration in migrations/versions (a test keeps the two equal). Every command
# checks the schema; comparing with this constant spares it importing Alembic (~0.1 s).
SCHEMA_HEAD = "0003"


def _stamped_revision(engine: sa.Engine) -> str | None:
    """The revision recorded in ``alembic_version``, read with one plain query (None if
    the table is missing or holds anything but one row)."""
    import sqlalchemy as sa
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    except DBAPIError:
        return None
    return str(rows[0][0]) if len(rows) == 1 else None


def check_schema(engine: sa.Engine) -> None:
    """Raise SchemaNotMigrated unless the application schema is at head."""
    if _stamped_revision(engine) == SCHEMA_HEAD:
        return
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if current is not None and not _is_known_revision(current):
        raise SchemaNotMigrated(
            f"database schema is at revision {current}, newer than this accessctl knows "
            f"(its head is {head}); upgrade accessctl"
        )
    state = "not migrated" if current is None else f"at revision {current}, expected {head}"
    raise SchemaNotMigrated(
        f"database {hide_password(engine.url.render_as_string(hide_password=False))} "
        f"schema is {state}; run `accessctl migrate`"
    )


def _is_known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def is_blank_database(engine: sa.Engine) -> bool:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return not sa.inspect(conn).get_table_names()


@contextlib.contextmanager
def migration_lock(engine: sa.Engine) -> Iterator[None]:
    """Serialize migrators: a Postgres advisory lock, or SQLite's write lock.

    On Postgres the lock is polled with ``pg_try_advisory_lock`` on an AUTOCOMMIT
    connection, never awaited with ``pg_advisory_lock``: a session blocked inside that call
    holds a snapshot, and DBOS's migrations run ``CREATE INDEX CONCURRENTLY``, which waits
    for every such snapshot in the database -- while the holder waits for the index. Ten
    concurrent ``accessctl migrate`` runs deadlocked that way (tests/test_bad_input.py).
    """
    import sqlalchemy as sa

    if for_engine(engine).is_sqlite:
        yield
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        waiting_logged = False
        while not conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY}
        ).scalar():
            if not waiting_logged:
                log.info("waiting for a concurrent migration to finish")
                waiting_logged = True
            time.sleep(MIGRATION_LOCK_POLL_SEC)
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})


def migrate(engine: sa.Engine) -> str:
    """Bring the application schema and DBOS's system schema to head. Idempotent.

    Returns the application schema's head revision."""
    from alembic import command
    from alembic.util.exc import CommandError
    from dbos import DBOS
    from sqlalchemy.exc import DBAPIError

    url = normalize_url(engine.url.render_as_string(hide_password=False))
    try:
        with migration_lock(engine):
            with engine.begin() as conn:
                # pysqlite does not begin a transaction for DDL: take SQLite's write lock
                # now, so a concurrent migrator waits instead of racing.
                for_engine(conn).begin_write(conn)
                command.upgrade(_alembic_config(conn), "head")
            # DBOS's system tables only: request transactions are plain transactions,
            # so nothing writes DBOS's datasource_outputs table any more (databases
            # created before keep theirs, unused).
            DBOS.migrate(url)
    except DBAPIError as exc:
        raise DatabaseUnreachable(
            f"migration of {hide_password(url)} failed: {describe_db_error(exc, url=engine.url)}"
        ) from None
    except CommandError as exc:
        # e.g. the database was migrated by a newer accessctl than this one.
        raise SchemaNotMigrated(
            f"cannot migrate {hide_password(url)}: {str(exc).splitlines()[0][:200]}; "
            "upgrade accessctl"
        ) from None
    head = head_revision()
    log.info("schema at head", revision=head, database=hide_password(url))
    return head


def ensure_schema(engine: sa.Engine, *, auto_create: bool) -> None:
    """Check the schema before a command touches it. A blank embedded SQLite database is
    created on first use; anything else unmigrated or outdated stops with exit 4."""
    if auto_create and for_engine(engine).is_sqlite and is_blank_database(engine):
        log.info("creating the embedded database schema")
        migrate(engine)
        return
    check_schema(engine)

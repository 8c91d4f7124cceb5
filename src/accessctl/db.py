"""Database URLs and engines: validation, connection checks, and SQLite made exact.

One URL serves both the application tables and DBOS's system tables. This module builds
every engine the program uses, so the SQLite fixes below apply to DBOS's queries too.

Why SQLite engines are special here (README, "How it stays correct"):

* DBOS stamps queue starts with ``strftime('%s','now')`` on Python < 3.12 (whole seconds,
  so its limiter over-admits) and with ``unixepoch('subsec')`` on 3.12+ (which SQLite before
  3.42 does not know: it yields NULL and DBOS cannot launch). Every SQLite connection gets
  both with millisecond precision (``dbos_compat.install_sqlite_clock``).
* pysqlite opens a transaction only at the first write, so DBOS's "count recent starts"
  read runs outside the transaction that claims the work: two processes could both count
  49 and both start. ``dbos_compat.serialize_sqlite_claims`` makes that one claim
  transaction ``BEGIN IMMEDIATE``; every other transaction keeps pysqlite's behaviour (the lock at the
  first write), so reads never queue behind writers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accessctl.dbos_compat import install_sqlite_clock
from accessctl.exceptions import ConfigError, DatabaseUnreachable

if TYPE_CHECKING:
    import sqlalchemy as sa

SQLITE_DRIVERS = ("sqlite", "sqlite+pysqlite")
POSTGRES_DRIVERS = ("postgresql", "postgresql+psycopg", "postgres")


def _make_url(url: str) -> sa.URL:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # The text may hold a password: name the problem, not the URL.
        raise ConfigError(
            "database URL is malformed; expected sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from None


def _is_secret_param(name: str) -> bool:
    # libpq takes ``?password=`` (and ``sslpassword=``) in the query string as well.
    return "password" in name.lower()


def dbos_table(engine: sa.Engine, name: str = "workflow_status") -> str:
    """A DBOS system table as raw SQL names it: in the ``dbos`` schema on Postgres, bare in
    the SQLite file."""
    from accessctl.backend import for_engine

    return for_engine(engine).dbos_table(name)


def hide_password(url: str) -> str:
    """The URL with any password (userinfo or query) replaced by ``***``, safe to show."""
    try:
        parsed = _make_url(url)
    except ConfigError:
        return "<malformed URL>"
    secret = {k: "***" for k in parsed.query if _is_secret_param(k)}
    if secret:
        parsed = parsed.update_query_dict(secret)
    return parsed.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def url_secrets(url: str | sa.URL) -> list[str]:
    """Every password a URL carries, to scrub from driver messages."""
    try:
        parsed = _make_url(url) if isinstance(url, str) else url
    except ConfigError:
        return []
    found = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if _is_secret_param(key):
            found.extend([value] if isinstance(value, str) else list(value))
    return [str(s) for s in found if s]


def normalize_url(url: str) -> str:
    """Spell Postgres URLs with the psycopg 3 driver, the one driver we ship."""
    parsed = _make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def validate_database_url(url: str) -> None:
    """Refuse a URL we cannot use, before anything connects."""
    if not url:
        raise ConfigError("database URL is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise ConfigError("database URL contains control characters (a NUL or a line break?)")
    parsed = _make_url(url)
    if parsed.drivername not in SQLITE_DRIVERS and _has_stray_at_sign(url):
        # An unencoded '@' in the password splits it: part of it would be shown as the host.
        raise ConfigError(
            "database URL is malformed: more than one '@' before the host; "
            "percent-encode special characters in the password (@ as %40, : as %3A, "
            "/ as %2F, ? as %3F, # as %23, [ ] as %5B %5D)"
        )
    if parsed.drivername in SQLITE_DRIVERS:
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(
                "a SQLite database URL needs a file path (sqlite:///PATH); "
                "an in-memory database cannot be shared between runs"
            )
        if not Path(parsed.database).is_absolute():
            # SQLite would resolve it against whatever directory the command runs in (cron,
            # systemd, a shell elsewhere), so each place would get a database of its own.
            raise ConfigError(
                f"the SQLite path {parsed.database[:200]!r} is relative, and accessctl never "
                "uses the current directory: give an absolute path, e.g. "
                "sqlite:////var/lib/accessctl/accessctl.sqlite (four slashes)"
            )
        return
    if parsed.drivername not in POSTGRES_DRIVERS:
        raise ConfigError(
            f"unsupported database driver {parsed.drivername!r} in {hide_password(url)}; "
            "use sqlite:///PATH or postgresql+psycopg://..."
        )
    if not parsed.database:
        raise ConfigError(f"database URL {hide_password(url)} names no database")


def _has_stray_at_sign(url: str) -> bool:
    """True when an '@' follows the userinfo's '@' before the query starts."""
    rest = url.split("://", 1)[-1]
    first = rest.find("@")
    return first >= 0 and "@" in rest[first + 1 :].split("?", 1)[0]


def is_sqlite_url(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path:
    database = _make_url(url).database
    assert database is not None
    return Path(database).expanduser()


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # As DBOS's own SQLite engines: writers take the lock at their first write.
    dbapi_conn.isolation_level = "IMMEDIATE"
    dbapi_conn.execute("PRAGMA busy_timeout=30000")
    dbapi_conn.execute("PRAGMA foreign_keys=ON")
    # WAL lets readers (status, errors) run while a batch writes.
    dbapi_conn.execute("PRAGMA journal_mode=WAL")
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")
    install_sqlite_clock(dbapi_conn)


def make_engine(
    url: str,
    *,
    connect_timeout: float = 5.0,
    create_dir: bool = False,
    pool_size: int = 3,
    pre_ping: bool = True,
) -> sa.Engine:
    """An engine for ``url``: exact clocks and WAL on SQLite, a bounded connect timeout
    on Postgres, and there, with ``pre_ping``, a liveness check at every checkout.

    An executing process turns the check off: it is a round trip (and a transaction in
    ``pg_stat_database``) per checkout, half of what a request cost (BENCHMARKS.md,
    "Transactions per request"). Without it a connection the server closed fails its
    first statement instead; SQLAlchemy then replaces every older connection of the pool,
    DBOS retries its own statements, and ours retry transient faults (workflows._run_tx)."""
    import sqlalchemy as sa
    from sqlalchemy import event

    validate_database_url(url)
    url = normalize_url(url)
    if is_sqlite_url(url):
        path = sqlite_path(url)
        if create_dir:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # read-only, or XDG_DATA_HOME names a file
                raise ConfigError(
                    f"cannot create the data directory {path.parent} ({exc.strerror}); "
                    "set XDG_DATA_HOME to a writable directory, or ACCESSCTL_DATABASE_URL"
                ) from None
        elif not path.parent.is_dir():
            raise ConfigError(f"SQLite directory {path.parent} does not exist (from {url})")
        engine = sa.create_engine(url, pool_size=20, max_overflow=20, pool_timeout=60)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=pre_ping,
        # ``pool_size`` connections stay open; bursts above it open overflow connections,
        # closed again on return. Read-only commands keep few; an executing process keeps
        # enough for its work, since a new Postgres connection costs a server process.
        pool_size=pool_size,
        max_overflow=10,
        connect_args={
            "connect_timeout": max(1, math.ceil(connect_timeout)),
            "application_name": "accessctl",
        },
    )


def check_connection(engine: sa.Engine) -> None:
    """Connect once, so an unreachable database is one clear error, not a traceback."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    raw = engine.url.render_as_string(hide_password=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise DatabaseUnreachable(
            f"cannot connect to {hide_password(raw)}: {describe_db_error(exc, url=engine.url)}"
        ) from None


def check_sqlite_integrity(engine: sa.Engine) -> None:
    """Refuse to execute or migrate on a damaged SQLite file (exit 3).

    A corrupt page only fails the statements that touch it, so without this `batch`
    exited 3 while `migrate` (and whatever missed the page) exited 0 and wrote on. ``PRAGMA
    quick_check`` reads every page without comparing indexes to tables: about 0.15 s per
    100 MB warm (measured on a 137 MB file), so only commands that write at scale pay it;
    readers meet the damage, if they touch it, as ``CORRUPT_HINT``."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from accessctl.backend import for_engine

    if not for_engine(engine).is_sqlite:
        return  # PostgreSQL checks its own pages (checksums, WAL)
    raw = engine.url.render_as_string(hide_password=False)
    try:
        with engine.connect() as conn:
            problems = [str(r[0]) for r in conn.execute(text("PRAGMA quick_check(3)"))]
    except DBAPIError as exc:
        problems = [describe_db_error(exc)]
    if problems != ["ok"]:
        # One line: SQLite's report spans lines ("*** in database main ***\nPage 13: ...").
        found = [p.strip() for row in problems for p in row.splitlines()]
        shown = "; ".join(p for p in found if p and not p.startswith("***"))
        raise DatabaseUnreachable(
            f"SQLite database {sqlite_path(raw)} is damaged ({shown[:200]}); " + CORRUPT_HINT
        )


# Appended wherever SQLite reports a damaged file, whichever command met it.
CORRUPT_HINT = (
    "restore it from a backup (docs/operations.md#backup-and-retention); nothing was written"
)


def describe_db_error(
    exc: BaseException, password: str | None = None, *, url: str | sa.URL | None = None
) -> str:
    """The driver's first line of explanation, with any password scrubbed out: ``password``
    and every password ``url`` carries (userinfo and query), and any ``user:password@``
    or ``password=...`` field, by ``redact.redact_text``. A short password is hidden only
    as a whole token, never as every matching substring: blanking each "p" of a message
    mangles it and gives the password away by elimination."""
    from accessctl.redact import redact_text

    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    hidden = ([password] if password else []) + (url_secrets(url) if url is not None else [])
    text = redact_text(text, hidden, limit=None)
    if "database disk image is malformed" in text:
        text += f": the SQLite file is damaged; {CORRUPT_HINT.split(';')[0]}"
    return text


def sqlstate_of(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None)

"""DBOS's lifecycle in one place: build, launch, bind the workflows, and shut down.

``executing_runtime`` is the only way the program starts DBOS. It checks the database and
schema first (exit 3 / 4 before anything runs), takes the executor lease, launches DBOS with
the pinned application version, registers the queue with the configured limits, adopts
dead executors' work, and on exit waits (bounded) for in-flight requests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from accessctl.db import check_connection, hide_password, make_engine, normalize_url
from accessctl.errors import ConfigError, DatabaseUnreachable, SchemaNotMigrated
from accessctl.settings import APP_NAME, Settings

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dbos import DBOSClient, Queue

    from accessctl.provider import ProviderConfig

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: sa.Engine
    executor_id: str
    queue: Queue
    client: DBOSClient


def open_engine(settings: Settings, *, pool_size: int = 3) -> sa.Engine:
    """An engine on the configured database, checked to be reachable (exit 3 if not)."""
    engine = make_engine(
        settings.database_url,
        connect_timeout=settings.connect_timeout,
        create_dir=settings.database_url_source == "default",
        pool_size=pool_size,
    )
    check_connection(engine)
    return engine


@contextlib.contextmanager
def database(settings: Settings, *, auto_create: bool | None = None) -> Iterator[sa.Engine]:
    """An engine whose schema is at head, for commands that do not execute workflows."""
    from accessctl.schema import ensure_schema

    engine = open_engine(settings)
    try:
        ensure_schema(
            engine, auto_create=settings.is_sqlite if auto_create is None else auto_create
        )
        yield engine
    finally:
        engine.dispose()


def serialize_sqlite_claims() -> None:
    """Make DBOS's queue-claim transaction ``BEGIN IMMEDIATE`` on SQLite.

    DBOS counts the limiter's recent starts and then claims work in what it means to be one
    transaction, but pysqlite only begins a transaction at the first write, so on SQLite the
    count ran unlocked and two processes could both admit the last slot. ``_begin`` is the
    hook DBOS 3.4 uses for exactly that claim (and nothing else): taking the write lock
    there serializes claims across processes. Pinned to dbos 3.4; tests/test_rate_limit.py
    proves the limit across processes.
    """
    from dbos._sys_db_sqlite import SQLiteSystemDatabase

    @contextlib.contextmanager
    def _begin_immediate(self: Any, isolation: str | None) -> Iterator[Any]:
        with self.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    SQLiteSystemDatabase._begin = _begin_immediate  # type: ignore[method-assign]


def drain_requests(grace: float) -> None:
    """Stop taking work, then let in-flight requests finish, for up to ``grace`` seconds.

    Only requests are waited for: a batch workflow here may be waiting on requests that
    nobody runs any more, and waiting for it would always cost the whole grace period.
    Whatever is still running when we exit stays PENDING under our executor ID, and is
    adopted by another process once our lease is gone."""
    from dbos._dbos import _get_dbos_instance

    from accessctl.workflows import QUEUE_NAME

    dbos = _get_dbos_instance()
    for stop in dbos.background_thread_stop_events:
        stop.set()  # the queue threads: nothing new is dequeued from here on
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if dbos._active_workflows_set.count_for_queue(QUEUE_NAME) == 0:
            return
        time.sleep(0.05)
    log.warning("shutdown grace over with requests still running; another process adopts them")


def _dbos_config(settings: Settings, engine: sa.Engine, executor_id: str) -> dict[str, Any]:
    from accessctl.workflows import WORKFLOW_VERSION

    url = normalize_url(settings.database_url)
    config: dict[str, Any] = {
        "name": APP_NAME,
        "system_database_url": url,
        "application_version": WORKFLOW_VERSION,
        "executor_id": executor_id,
        # `accessctl migrate` (or the embedded first run) owns the schema.
        "run_migrations": False,
        "notification_listener_polling_interval_sec": settings.poll_interval,
        "max_executor_threads": max(64, settings.concurrency * 4),
        # DBOS sets its logger's level from this; keep what logs.configure_logging chose.
        "log_level": logging.getLevelName(logging.getLogger("dbos").getEffectiveLevel()),
    }
    # One pool for DBOS and our transactions (on SQLite it also carries the exact
    # millisecond clock, see db.py): see executing_runtime for its size.
    config["system_database_engine"] = engine
    return config


def provider_config(settings: Settings) -> ProviderConfig | None:
    from accessctl.provider import ProviderConfig, call_slack_for, warm_up

    if not settings.provider_url:
        return None
    warm_up(settings.provider_timeout)
    return ProviderConfig(
        url=settings.provider_url,
        token=settings.provider_token,
        timeout=settings.provider_timeout,
        max_attempts=settings.provider_max_attempts,
        deadline=settings.provider_deadline,
        call_slack=call_slack_for(settings.rate_limit.period if settings.rate_limit else None),
    )


# With the limit lifted: 50 polls a second per process, each one short claim query.
UNLIMITED_POLL_SEC = 0.02


def queue_polling_interval(settings: Settings) -> float:
    """How often the request queue polls. Nothing wakes a queue when a limiter window
    frees up, so each window starts up to one interval late: keep that near 2% of the
    period (10/2 polls every 0.04 s), and never slower than the configured interval.
    Without a limiter the concurrency limit is what admits: a finished request's slot is
    refilled at the next poll, so poll often enough that the slots never sit empty long."""
    if settings.rate_limit is None:
        return min(settings.poll_interval, UNLIMITED_POLL_SEC)
    return min(settings.poll_interval, max(0.02, settings.rate_limit.period / 50))


def queue_window(settings: Settings, provider: ProviderConfig | None) -> float | None:
    """The request queue's limiter period: the configured one widened by the provider's
    call slack (see workflows.call_provider_step for why calls then respect the limit)."""
    if settings.rate_limit is None:
        return None
    return settings.rate_limit.period + (provider.call_slack if provider else 0.0)


def filing_client(settings: Settings, engine: sa.Engine) -> DBOSClient:
    """A DBOS client on our engine (its pool, and on SQLite its exact clock)."""
    from dbos import DBOSClient

    return DBOSClient(
        system_database_engine=engine,
        dbos_system_schema=None if settings.is_sqlite else "dbos",
        application_name=APP_NAME,
        lazy=True,
    )


def register_queues(
    client: DBOSClient, settings: Settings, provider: ProviderConfig | None
) -> None:
    from accessctl import workflows

    window = queue_window(settings, provider)
    limiter = (
        {"limit": settings.rate_limit.limit, "period": window}
        if settings.rate_limit and window is not None
        else None
    )
    client.register_queue(
        workflows.QUEUE_NAME,
        limiter=limiter,  # type: ignore[arg-type]
        global_concurrency=settings.concurrency,
        worker_concurrency=settings.concurrency,
        polling_interval_sec=queue_polling_interval(settings),
        on_conflict="always_update",
    )
    client.register_queue(
        workflows.BATCH_QUEUE_NAME,
        polling_interval_sec=settings.poll_interval,
        on_conflict="always_update",
    )


@contextlib.contextmanager
def executing_runtime(settings: Settings) -> Iterator[Runtime]:
    """Launch DBOS in this process as an executor of the access-request queue."""
    from dbos import DBOS
    from dbos._error import DBOSInitializationError

    from accessctl import workflows
    from accessctl.lease import Adopter, gate_dequeue_on_lease, make_lease, new_executor_id
    from accessctl.schema import ensure_schema

    # Each request in flight holds one connection at a time, DBOS's pollers, listener
    # and the batch followers a few more: keep that many open, or requests pay for new
    # Postgres server processes (docs/operations.md, "Database connections").
    engine = open_engine(settings, pool_size=settings.concurrency + 6)
    lease = None
    adopter = None
    client = None
    launched = False
    try:
        ensure_schema(engine, auto_create=settings.is_sqlite)
        executor_id = new_executor_id()
        lease = make_lease(engine, executor_id)
        lease.acquire()
        if settings.is_sqlite:
            serialize_sqlite_claims()
        gate_dequeue_on_lease()  # before launch: DBOS starts dequeuing inside it
        DBOS(config=_dbos_config(settings, engine, executor_id))  # type: ignore[arg-type]
        provider = provider_config(settings)
        # Before launch: queued work from an earlier run may start the moment DBOS is up.
        bound = workflows.bind(engine, settings.poll_interval, provider)
        client = filing_client(settings, engine)
        # Registered before launch, so DBOS starts polling both queues at once instead of
        # discovering them on its next scan (a second later).
        register_queues(client, settings, provider)
        try:
            DBOS.launch()
        except DBOSInitializationError as exc:
            raise SchemaNotMigrated(
                f"DBOS system schema in {hide_password(settings.database_url)} is not ready "
                f"({str(exc).splitlines()[0][:200]}); run `accessctl migrate`"
            ) from None
        launched = True
        queue = DBOS.retrieve_queue(workflows.QUEUE_NAME)
        assert queue is not None
        bound.set_queue(queue)
        adopter = Adopter(
            lease,
            workflows.WORKFLOW_VERSION,
            limited_queue=workflows.QUEUE_NAME,
            period=queue_window(settings, provider),
            grace=lease.adoption_grace(provider.timeout if provider else None),
        )
        adopter.start()
        log.debug("runtime up", executor=executor_id, rate_limit=str(settings.rate_limit))
        yield Runtime(settings, engine, executor_id, queue, client)
    finally:
        if adopter is not None:
            adopter.stop()
        if launched:
            drain_requests(settings.shutdown_grace)
            DBOS.destroy(workflow_completion_timeout_sec=0)
        else:
            with contextlib.suppress(Exception):
                DBOS.destroy()
        workflows.unbind()
        if client is not None:
            client.destroy()
        if lease is not None:
            lease.release()
        engine.dispose()


def map_runtime_error(exc: BaseException, settings: Settings) -> Exception:
    """Turn a driver error met while running into the operator-facing error type."""
    from accessctl.db import describe_db_error

    url = hide_password(settings.database_url)
    if isinstance(exc, (ConfigError, DatabaseUnreachable, SchemaNotMigrated)):
        return exc
    return DatabaseUnreachable(f"database {url} failed: {describe_db_error(exc)}")

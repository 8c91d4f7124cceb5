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

from accessctl.db import (
    check_connection,
    check_sqlite_integrity,
    hide_password,
    make_engine,
    normalize_url,
    sqlite_path,
)
from accessctl.exceptions import ConfigError, SchemaNotMigrated
from accessctl.limits import SharedLimit, check_configured, ensure_shared_limit, following
from accessctl.settings import APP_NAME, Settings

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dbos import DBOSClient

    from accessctl.pacing import Waker
    from accessctl.provider import ProviderConfig

log = structlog.get_logger(__name__)

NOTIFY_COALESCE_SEC = 0.1


@dataclass
class Runtime:
    settings: Settings
    engine: sa.Engine
    executor_id: str
    client: DBOSClient


def open_engine(
    settings: Settings, *, pool_size: int = 3, check: bool = True, pre_ping: bool = True
) -> sa.Engine:
    """An engine on the configured database, checked to be reachable (exit 3 if not) and,
    with ``check`` (executing and migrating), a SQLite file checked to be undamaged."""
    engine = make_engine(
        settings.database_url,
        connect_timeout=settings.connect_timeout,
        create_dir=settings.database_url_source == "default",
        pool_size=pool_size,
        pre_ping=pre_ping,
    )
    try:
        check_connection(engine)
        if check:
            check_sqlite_integrity(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[sa.Engine]:
    """An engine whose schema is at head, for commands that do not execute workflows."""
    from accessctl.schema import ensure_schema

    engine = open_engine(settings, check=False)  # readers: see check_sqlite_integrity
    try:
        ensure_schema(engine, auto_create=settings.is_sqlite)
        yield engine
    finally:
        engine.dispose()


def drain_requests(grace: float) -> None:
    """Stop taking work, then let in-flight requests finish, for up to ``grace`` seconds.

    Only requests are waited for: a batch workflow here may be waiting on requests that
    nobody runs any more, and waiting for it would always cost the whole grace period
    (which is why this is not ``DBOS.destroy(workflow_completion_timeout_sec=...)``: see
    dbos_compat.py). Whatever is still running when we exit stays PENDING under our
    executor ID, and is adopted by another process once our lease is gone."""
    from accessctl.dbos_compat import requests_running, stop_dequeuing
    from accessctl.workflows import QUEUE_NAME

    deadline = time.monotonic() + grace
    stop_dequeuing(grace)
    if requests_running(QUEUE_NAME):
        # Said before waiting: the wait can take the whole grace (a second signal ends it).
        log.info("waiting for in-flight requests to finish", grace_seconds=grace)
    while requests_running(QUEUE_NAME):
        if time.monotonic() >= deadline:
            log.warning(
                "shutdown grace over with requests still running; another process adopts them"
            )
            return
        time.sleep(0.05)


def _stop_dbos(launched: bool, grace: float) -> None:
    """Drain a launched DBOS, then destroy its instance whatever the drain met: DBOS keeps
    one instance per process, and one left behind would be handed to the next runtime in
    this process (the server's, a test's) with its threads stopped and its database gone."""
    from dbos import DBOS

    if not launched:
        with contextlib.suppress(Exception):
            DBOS.destroy()
        return
    try:
        drain_requests(grace)
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=0)


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
        # DBOS flushes its event notifications every 10 ms by default: a hundred wake-ups
        # a second in every process, for events accessctl does not use. Not much longer
        # either: every exit (DBOS.destroy) joins the flushing thread mid-sleep, and at
        # 0.5 s that was a quarter of a `submit` on Postgres (BENCHMARKS.md, #17).
        "notification_coalesce_sec": NOTIFY_COALESCE_SEC,
        "max_executor_threads": max(64, settings.concurrency * 4),
        # DBOS sets its logger's level from this; keep what logs.configure_logging chose.
        "log_level": logging.getLevelName(logging.getLogger("dbos").getEffectiveLevel()),
    }
    # One pool for DBOS and our transactions (on SQLite it also carries the exact
    # millisecond clock, see db.py): see executing_runtime for its size.
    config["system_database_engine"] = engine
    return config


def provider_config(settings: Settings, shared: SharedLimit) -> ProviderConfig | None:
    from accessctl.provider import ProviderConfig, call_slack_for, warm_up

    if not settings.provider_url:
        return None
    if shared.rate_limit is not None and shared.call_slack == 0:
        log.warning(
            "the shared limit's window has no provider call slack, so calls can exceed it "
            "slightly; set it again with the provider configured: accessctl limit set "
            f"{shared.rate_limit}"
        )
    warm_up(settings.provider_timeout)
    period = shared.rate_limit.period if shared.rate_limit else None
    return ProviderConfig(
        url=settings.provider_url,
        token=settings.provider_token,
        timeout=settings.provider_timeout,
        max_attempts=settings.provider_max_attempts,
        deadline=settings.provider_deadline,
        call_slack=shared.call_slack or call_slack_for(period),
    )


def filing_client(settings: Settings, engine: sa.Engine) -> DBOSClient:
    """A DBOS client on our engine (its pool, and on SQLite its exact clock)."""
    from dbos import DBOSClient

    from accessctl.dbos_compat import check_dbos_version

    check_dbos_version()
    return DBOSClient(
        system_database_engine=engine,
        dbos_system_schema=None if settings.is_sqlite else "dbos",
        application_name=APP_NAME,
        lazy=True,
    )


def shared_limit_for(settings: Settings, client: DBOSClient, engine: sa.Engine) -> SharedLimit:
    """The stored limit this run follows (stored first on a new database); exit 2 if the
    run's own limit, given on purpose, differs."""
    shared = ensure_shared_limit(client, engine, settings, reason="first run")
    check_configured(settings, shared)
    return shared


def start_pacing(engine: sa.Engine, settings: Settings) -> Waker:
    """A fresh pacer for this runtime (pacing.py), DBOS's loops hooked to it, and the
    thread that wakes it (returned, to stop): on Postgres a LISTEN, on SQLite a look at
    the database file."""
    from accessctl import pacing
    from accessctl.backend import for_engine
    from accessctl.dbos_compat import pace_dbos_loops, requests_running
    from accessctl.workflows import QUEUE_NAME

    pace_dbos_loops()
    pacer = pacing.reset(refill=for_engine(engine).refill_freed_slots)
    pacer.count_running(lambda: requests_running(QUEUE_NAME))
    waker: Waker = (
        pacing.FileWatcher(sqlite_path(normalize_url(settings.database_url)), pacer)
        if settings.is_sqlite
        else pacing.WorkListener(engine, pacer)
    )
    waker.start()
    return waker


@contextlib.contextmanager
def executing_runtime(settings: Settings) -> Iterator[Runtime]:
    """Launch DBOS in this process as an executor of the access-request queue."""
    from dbos import DBOS, error

    from accessctl import workflows
    from accessctl.dbos_compat import (
        cap_process_concurrency,
        check_dbos_version,
        serialize_postgres_claims,
        serialize_sqlite_claims,
        share_concurrency,
    )
    from accessctl.lease import Adopter, gate_dequeue_on_lease, make_lease, new_executor_id
    from accessctl.schema import ensure_schema

    # Each request in flight holds one connection at a time, DBOS's pollers, listener
    # and the batch followers a few more: keep that many open, or requests pay for new
    # Postgres server processes (docs/operations.md, "Database connections").
    check_dbos_version()
    engine = open_engine(settings, pool_size=settings.concurrency + 6, pre_ping=False)
    lease = None
    adopter = None
    client = None
    listener = None
    launched = False
    try:
        ensure_schema(engine, auto_create=settings.is_sqlite)
        executor_id = new_executor_id()
        lease = make_lease(engine, executor_id)
        try:
            lease.acquire()
        except OSError as exc:  # SQLite: the lease directory beside a read-only database
            raise ConfigError(
                f"cannot take the executor lease beside {hide_password(settings.database_url)} "
                f"({exc.strerror}); the database's directory must be writable"
            ) from None
        client = filing_client(settings, engine)
        # Before launch: DBOS then polls both queues at once instead of discovering them
        # on its next scan (a second later), and a refused run leaves nothing behind.
        shared = shared_limit_for(settings, client, engine)
        settings = following(settings, shared)
        if settings.is_sqlite:
            serialize_sqlite_claims()
        else:
            serialize_postgres_claims()
        cap_process_concurrency(settings.worker_concurrency)
        share_concurrency(lease.peers)
        gate_dequeue_on_lease()  # before launch: DBOS starts dequeuing inside it
        listener = start_pacing(engine, settings)
        DBOS(config=_dbos_config(settings, engine, executor_id))  # type: ignore[arg-type]
        provider = provider_config(settings, shared)
        # Before launch: queued work from an earlier run may start the moment DBOS is up.
        workflows.bind(engine, settings.poll_interval, provider, client)
        try:
            DBOS.launch()
        except error.DBOSInitializationError as exc:
            raise SchemaNotMigrated(
                f"DBOS system schema in {hide_password(settings.database_url)} is not ready "
                f"({str(exc).splitlines()[0][:200]}); run `accessctl migrate`"
            ) from None
        launched = True
        adopter = Adopter(
            lease,
            workflows.WORKFLOW_VERSION,
            limited_queue=workflows.QUEUE_NAME,
            period=shared.window,
            grace=lease.adoption_grace(provider.timeout if provider else None),
        )
        adopter.start()
        log.debug("runtime up", executor=executor_id, shared_limit=shared.describe())
        yield Runtime(settings, engine, executor_id, client)
    finally:
        if adopter is not None:
            adopter.stop()
        try:
            _stop_dbos(launched, settings.shutdown_grace)
        finally:
            if listener is not None:
                listener.stop()
            workflows.unbind()
            if client is not None:
                client.destroy()
            if lease is not None:
                share_concurrency(None)
                lease.release()
            engine.dispose()

"""The shared rate limit: a property of the database, set on purpose, followed by everyone.

The model (README, "What the rate limit is and who may change it"):

* The limit belongs to the downstream, so it lives where every process sees it: the
  request queue's row in DBOS's ``queues`` table. DBOS's queue threads re-read that row on
  every poll, so a change reaches every running worker within one poll.
* A new database gets the configured value (``--rate-limit``/``ACCESSCTL_RATE_LIMIT``,
  else 50/30) once: at ``accessctl migrate``, or at the first run on a database that has
  no queue yet. After that only ``accessctl limit set`` changes it, and each change is
  recorded (who, when, what) in ``limit_changes``.
* Every other process follows the stored value. One whose configured value was given on
  purpose (a flag, the environment, the config file) and differs is refused with exit 2
  before anything is filed: an ad-hoc ``--rate-limit 1000/1`` never throttles or floods
  production behind the operator's back.

When a provider is configured, the queue's window is the period widened by the call slack
(``provider.call_slack_for``): a request calls within half the slack of its start, so any
window of the configured period at the provider holds at most L calls. The slack is
decided when the limit is set and stored with it, so every process uses the same window.
"""

from __future__ import annotations

import getpass
import math
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from accessctl.backend import for_engine
from accessctl.exceptions import UsageError
from accessctl.settings import RateLimit, Settings

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dbos import DBOSClient, Queue

log = structlog.get_logger(__name__)

# With the limit lifted: 50 polls a second per process, each one short claim query.
UNLIMITED_POLL_SEC = 0.02


@dataclass(frozen=True)
class SharedLimit:
    """The limit every process applies, as stored in the database."""

    rate_limit: RateLimit | None
    concurrency: int
    call_slack: float  # seconds the queue's window is wider than the period
    polling_interval: float
    changed_at: datetime | None = None
    changed_by: str | None = None
    reason: str | None = None

    @property
    def window(self) -> float | None:
        """The request queue's limiter period: the period plus the call slack."""
        return None if self.rate_limit is None else self.rate_limit.period + self.call_slack

    def describe(self) -> str:
        rate = str(self.rate_limit) if self.rate_limit else "none"
        return f"{rate} (concurrency {self.concurrency})"

    def as_dict(self) -> dict[str, Any]:
        from accessctl.queries import iso_utc

        return {
            "rate_limit": str(self.rate_limit) if self.rate_limit else "none",
            "limit": self.rate_limit.limit if self.rate_limit else None,
            "period": self.rate_limit.period if self.rate_limit else None,
            "concurrency": self.concurrency,
            "call_slack": self.call_slack,
            "window": self.window,
            "polling_interval": self.polling_interval,
            "changed_at": iso_utc(self.changed_at) if self.changed_at else None,
            "changed_by": self.changed_by,
            "reason": self.reason,
        }


def queue_polling_interval(rate_limit: RateLimit | None, poll_interval: float) -> float:
    """How often the request queue polls. Nothing wakes a queue when a limiter window
    frees up, so each window starts up to one interval late: keep that near 2% of the
    period (10/2 polls every 0.04 s), and never slower than the configured interval.
    Without a limiter the concurrency limit is what admits: a finished request's slot is
    refilled at the next poll, so poll often enough that the slots never sit empty long."""
    if rate_limit is None:
        return min(poll_interval, UNLIMITED_POLL_SEC)
    return min(poll_interval, max(0.02, rate_limit.period / 50))


def planned_limit(
    rate_limit: RateLimit | None, concurrency: int, *, with_provider: bool, poll_interval: float
) -> SharedLimit:
    """The shared limit that setting ``rate_limit``/``concurrency`` stores."""
    from accessctl.provider import call_slack_for

    slack = call_slack_for(rate_limit.period) if rate_limit and with_provider else 0.0
    return SharedLimit(
        rate_limit, concurrency, slack, queue_polling_interval(rate_limit, poll_interval)
    )


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers) and no LOGNAME/USER
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


def _last_change(engine: sa.Engine) -> Any:
    import sqlalchemy as sa

    from accessctl.models import LimitChange

    with engine.connect() as conn:
        return conn.execute(
            sa.select(LimitChange).order_by(LimitChange.changed_at.desc()).limit(1)
        ).first()


def _from_queue(queue: Queue, engine: sa.Engine) -> SharedLimit:
    """Read the stored limit; the call slack and the audit fields come from the last
    recorded change when it describes the stored window (a database set up by 0.2.0 has
    none: its window is taken as the period)."""
    # The public getters re-read the row: three small reads, once per process start.
    limiter = queue.limiter
    concurrency = int(queue.global_concurrency or 0)
    change = _last_change(engine)
    slack = 0.0
    rate: RateLimit | None = None
    if limiter is not None:
        window = float(limiter["period"])
        if change is not None and change.period is not None:
            recorded_window = change.period + change.call_slack
            if math.isclose(recorded_window, window, abs_tol=1e-6):
                slack = change.call_slack
        rate = RateLimit(int(limiter["limit"]), round(window - slack, 6))
    return SharedLimit(
        rate_limit=rate,
        concurrency=concurrency,
        call_slack=slack,
        polling_interval=float(queue.polling_interval_sec),
        changed_at=change.changed_at if change is not None else None,
        changed_by=change.changed_by if change is not None else None,
        reason=change.reason if change is not None else None,
    )


def read_shared_limit(client: DBOSClient, engine: sa.Engine) -> SharedLimit | None:
    """The stored limit, or None when no process has registered the queue yet."""
    from accessctl.workflows import QUEUE_NAME

    queue = client.retrieve_queue(QUEUE_NAME)
    return None if queue is None else _from_queue(queue, engine)


def _write(
    client: DBOSClient,
    engine: sa.Engine,
    limit: SharedLimit,
    *,
    reason: str,
    overwrite: bool,
    batch_poll_interval: float,
) -> None:
    """Write the queue rows (and record the change). ``overwrite`` False keeps a row
    another process wrote first (DBOS's ``never_update``)."""
    import sqlalchemy as sa

    from accessctl.models import LimitChange, utcnow
    from accessctl.workflows import BATCH_QUEUE_NAME, QUEUE_NAME

    window = limit.window
    client.register_queue(
        QUEUE_NAME,
        limiter=(
            {"limit": limit.rate_limit.limit, "period": window}
            if limit.rate_limit and window is not None
            else None
        ),
        global_concurrency=limit.concurrency,
        worker_concurrency=limit.concurrency,
        polling_interval_sec=limit.polling_interval,
        on_conflict="always_update" if overwrite else "never_update",
    )
    client.register_queue(
        BATCH_QUEUE_NAME, polling_interval_sec=batch_poll_interval, on_conflict="never_update"
    )
    values = {
        "id": uuid.uuid4(),
        "changed_at": utcnow(),
        "changed_by": _who(),
        "reason": reason,
        "rate_limit": limit.rate_limit.limit if limit.rate_limit else None,
        "period": limit.rate_limit.period if limit.rate_limit else None,
        "call_slack": limit.call_slack,
        "concurrency": limit.concurrency,
    }
    with engine.begin() as conn:
        # Executors holding a queue until its window opens look again now, at this limit.
        for_engine(conn).announce_work(conn)
        if overwrite:
            conn.execute(sa.insert(LimitChange).values(**values))
        else:
            # The first store: recorded once, however many processes raced to store it
            # (SQLite serializes the statement; Postgres's migrate holds its lock).
            columns = list(values)
            chosen = sa.select(*(sa.literal(values[c]) for c in columns)).where(
                ~sa.exists().select_from(LimitChange)
            )
            conn.execute(sa.insert(LimitChange).from_select(columns, chosen))


def ensure_shared_limit(
    client: DBOSClient, engine: sa.Engine, settings: Settings, *, reason: str
) -> SharedLimit:
    """The stored limit; on a database without one, store the configured one first."""
    stored = read_shared_limit(client, engine)
    if stored is not None:
        from accessctl.workflows import BATCH_QUEUE_NAME

        if client.retrieve_queue(BATCH_QUEUE_NAME) is None:
            client.register_queue(
                BATCH_QUEUE_NAME,
                polling_interval_sec=settings.poll_interval,
                on_conflict="never_update",
            )
        return stored
    stored = _store(
        client, engine, settings, settings.rate_limit, settings.concurrency, reason=reason
    )
    log.info("shared rate limit stored", limit=stored.describe(), reason=reason)
    return stored


def _store(
    client: DBOSClient,
    engine: sa.Engine,
    settings: Settings,
    rate_limit: RateLimit | None,
    concurrency: int,
    *,
    reason: str,
    overwrite: bool = False,
) -> SharedLimit:
    """Plan the limit (the call slack follows this process's provider setting), write it
    (``limit set`` overwrites; a first store keeps what another process wrote first) and
    read back what is stored."""
    planned = planned_limit(
        rate_limit,
        concurrency,
        with_provider=bool(settings.provider_url),
        poll_interval=settings.poll_interval,
    )
    _write(
        client,
        engine,
        planned,
        reason=reason,
        overwrite=overwrite,
        batch_poll_interval=settings.poll_interval,
    )
    stored = read_shared_limit(client, engine)
    assert stored is not None
    return stored


def set_shared_limit(
    client: DBOSClient,
    engine: sa.Engine,
    settings: Settings,
    *,
    rate_limit: RateLimit | None,
    concurrency: int,
) -> tuple[SharedLimit | None, SharedLimit]:
    """``accessctl limit set``: (the limit before, the limit now)."""
    before = read_shared_limit(client, engine)
    after = _store(
        client, engine, settings, rate_limit, concurrency, reason="limit set", overwrite=True
    )
    log.info(
        "shared rate limit changed",
        before=before.describe() if before else None,
        after=after.describe(),
        by=after.changed_by,
    )
    return before, after


def _same_rate(a: RateLimit | None, b: RateLimit | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.limit == b.limit and math.isclose(a.period, b.period, abs_tol=1e-6)


def check_configured(settings: Settings, shared: SharedLimit) -> None:
    """Refuse (exit 2) a run whose limit, given on purpose, differs from the stored one."""
    source = settings.sources.get("rate_limit", "default")
    if source != "default" and not _same_rate(settings.rate_limit, shared.rate_limit):
        configured = str(settings.rate_limit) if settings.rate_limit else "none"
        stored = str(shared.rate_limit) if shared.rate_limit else "none"
        raise UsageError(
            f"rate limit {configured} (from {source}) differs from the shared limit {stored} "
            f"stored in the database; a run cannot change it: `accessctl limit set "
            f"{configured}` does, or drop {source} to follow the shared limit"
        )
    source = settings.sources.get("concurrency", "default")
    if source != "default" and settings.concurrency != shared.concurrency:
        raise UsageError(
            f"concurrency {settings.concurrency} (from {source}) differs from the shared "
            f"concurrency {shared.concurrency} stored in the database; a run cannot change "
            f"it: `accessctl limit set --concurrency {settings.concurrency}` does, or drop "
            f"{source} to follow the shared value"
        )


def following(settings: Settings, shared: SharedLimit) -> Settings:
    """``settings`` with the shared limit in place of the configured one."""
    from dataclasses import replace

    return replace(settings, rate_limit=shared.rate_limit, concurrency=shared.concurrency)

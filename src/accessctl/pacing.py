"""How often an executing process looks at the database, and what wakes it sooner.

A process with nothing to do must cost next to nothing (BENCHMARKS.md, "Idle workers"),
yet take up new work within a second and start a request the moment a limiter window
opens. Every loop that polls the database in an executing process (DBOS's queue threads
and its delayed-work job, hooked in dbos_compat.py; the lease keeper and the adopter,
lease.py; a worker's report, worker.py) waits through one ``Pacer``:

* **busy** (work claimed, a request running, or a wake-up in the last ``IDLE_AFTER_SEC``):
  each loop keeps its own short interval;
* **idle**: each loop waits ``idle_poll`` seconds (``IDLE_POLL_SEC``), unless woken;
* **woken** by: new work filed (Postgres: ``NOTIFY accessctl_work`` from the filing
  transaction, heard by a ``LISTEN`` thread; SQLite: the database file changed, seen by
  a ``stat`` every ``FILE_CHECK_SEC``); work filed or adopted in this process; a
  delayed try falling due; the lease coming back; stopping;
* a queue blocked by its rate limit waits until its window opens (``hold``), computed
  from the starts in the window, instead of polling for it;
* a busy queue looks again as soon as one of this process's requests on it ends
  (``slot_freed``; Postgres, see backend.py), not at its next interval, at most one look
  per ``REFILL_GAP_SEC``.

Waking is a hint, never the only way work is found: a lost notification (the listener
reconnecting after a database restart) costs at most one idle interval.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from accessctl.backend import PostgresBackend

if TYPE_CHECKING:
    import sqlalchemy as sa

log = structlog.get_logger(__name__)

# Without new signs of work for this long, a process counts as idle.
IDLE_AFTER_SEC = 2.0
# An idle process's loops look at the database this often (or when woken).
IDLE_POLL_SEC = 10.0
# A batch being followed is read at least this often, however long nothing changes.
FOLLOW_MAX_SEC = 2.0
# A long wait checks its stop flag this often (stopping wakes it sooner: ``wake``).
STOP_CHECK_SEC = 1.0
# SQLite: how often the database file is looked at for another process's commit.
FILE_CHECK_SEC = 0.2
# A queue refilling the slots its requests freed looks at most this often after its last
# look. A claim costs about 3 ms of CPU in DBOS, so requests that end close together are
# claimed for in one transaction, not one each (10 ms beat 4 and 16 at the default
# concurrency: BENCHMARKS.md, "Idle workers, pickup and scaling out").
REFILL_GAP_SEC = 0.010


class Pacer:
    """The process's one view of whether it is busy, and the wake-ups every loop shares."""

    def __init__(
        self,
        *,
        idle_poll: float = IDLE_POLL_SEC,
        idle_after: float = IDLE_AFTER_SEC,
        clock: Callable[[], float] = time.monotonic,
        refill: bool = True,
    ) -> None:
        self.idle_poll = idle_poll
        self.idle_after = idle_after
        self.refill = refill  # whether a freed slot ends its queue's wait (backend.py)
        self._clock = clock
        self._cond = threading.Condition()
        self._generation = 0
        # Busy from the start: whatever an earlier run left queued is taken at once.
        self._busy_until = clock() + idle_after
        self._due: float | None = None
        # Loop name -> (until when it holds, whether a freed slot ends the hold: a queue
        # full of others' requests, not a limiter window).
        self._holds: dict[str, tuple[float, bool]] = {}
        self._freed: dict[str, int] = {}
        self._running: Callable[[], int] = lambda: 0
        self.wakeups = 0
        self.activities = 0  # signs of work so far: a reader skips a look when unchanged

    # --- what the process learns ---------------------------------------------------------

    def activity(self) -> None:
        """Work was seen (claimed, or waiting behind a limit): stay busy a while longer."""
        self.activities += 1
        until = self._clock() + self.idle_after
        if until > self._busy_until:
            self._busy_until = until

    def wake(self) -> None:
        """New work may be there: every waiting loop looks now."""
        with self._cond:
            self.activity()
            self._generation += 1
            self.wakeups += 1
            self._cond.notify_all()

    def due_in(self, seconds: float) -> None:
        """A delayed try falls due in ``seconds``: be awake for it."""
        at = self._clock() + max(0.0, seconds)
        with self._cond:
            if self._due is None or at < self._due:
                self._due = at
            self._cond.notify_all()

    def hold(self, name: str, seconds: float, *, until_freed: bool = False) -> None:
        """Loop ``name`` has nothing it may start for ``seconds``: a limiter window, or
        (``until_freed``) a concurrency limit full, which a slot freeing ends sooner."""
        self._holds[name] = (self._clock() + max(0.0, seconds), until_freed)

    def release(self, name: str) -> None:
        self._holds.pop(name, None)

    def slot_freed(self, name: str) -> None:
        """One of this process's runs on queue ``name`` ended (its outcome is written):
        the queue may start another now."""
        if not self.refill:
            return
        with self._cond:
            self._freed[name] = self._freed.get(name, 0) + 1
            if self._holds.get(name, (0.0, False))[1]:
                self._holds.pop(name, None)
            self._cond.notify_all()

    def count_running(self, running: Callable[[], int]) -> None:
        """How many requests this process runs now: a process running any is busy."""
        self._running = running

    # --- what the loops ask --------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes at every wake-up (a reader may drop what it cached before one)."""
        return self._generation

    def busy(self) -> bool:
        if self._clock() < self._busy_until:
            return True
        try:
            return self._running() > 0
        except Exception:  # never let a count stop a loop: assume work
            return True

    def wait(self, stop: threading.Event, busy_interval: float, name: str = "") -> bool:
        """Wait as loop ``name`` should before it looks again: ``busy_interval`` while
        busy, until its window opens while held, ``idle_poll`` while idle, all cut short
        by a wake-up or a due time. True once ``stop`` is set, like ``Event.wait``."""
        start = self._clock()
        with self._cond:
            generation = self._generation
            seen = self._freed.get(name, 0)
        refill = False
        while True:
            if stop.is_set():
                return True
            now = self._clock()
            freed = self._freed.get(name, 0)
            if freed != seen:
                seen = freed
                # A limiter window is not shortened by a slot (a full queue's hold was
                # dropped by ``slot_freed``).
                refill = refill or name not in self._holds
            if refill and now >= start + REFILL_GAP_SEC:
                return False  # a slot of ours freed: refill it now
            held = self._holds.get(name, (None, False))[0]
            if held is not None and held > now:
                deadline = held
            elif held is not None:
                self._holds.pop(name, None)
                return False  # the window is open: look now
            elif refill:
                deadline = start + REFILL_GAP_SEC
            elif self.busy():
                deadline = start + busy_interval
            else:
                deadline = start + self.idle_poll
            due = self._due
            if due is not None and due <= now:
                with self._cond:
                    if self._due is not None and self._due <= now:
                        self._due = None
                self.wake()
                return False
            if due is not None:
                deadline = min(deadline, due)
            if now >= deadline:
                return stop.is_set()
            with self._cond:
                if self._generation != generation:
                    return stop.is_set()
                if self._freed.get(name, 0) == seen:
                    self._cond.wait(min(STOP_CHECK_SEC, deadline - now))
                if self._generation != generation:
                    return stop.is_set()


class FollowPace:
    """How long to wait before reading a followed batch again: ``base`` after a change,
    doubling while nothing changes, up to ``FOLLOW_MAX_SEC`` (a batch held by a long
    limiter window is read every two seconds, not ten times a second)."""

    def __init__(self, base: float, ceiling: float = FOLLOW_MAX_SEC) -> None:
        self.base = base
        self.ceiling = max(base, ceiling)
        self.current = base

    def after(self, changed: bool) -> float:
        self.current = self.base if changed else min(self.ceiling, self.current * 2)
        return self.current


_pacer = Pacer()


def pacer() -> Pacer:
    """This process's pacer."""
    return _pacer


def reset(**kwargs: Any) -> Pacer:
    """A fresh pacer for a new executing runtime (tests start several in one process)."""
    global _pacer
    _pacer = Pacer(**kwargs)
    return _pacer


# --- wake-up sources -------------------------------------------------------------------------


class Waker:
    """A daemon thread that wakes the pacer when it learns of new work."""

    name = "accessctl-waker"

    def __init__(self, target: Pacer) -> None:
        self.pacer = target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        raise NotImplementedError


class FileWatcher(Waker):
    """SQLite: wakes the pacer when the database or its write-ahead log changes (another
    process's commit; an idle process's own looks only read). A ``stat`` of two files
    every ``FILE_CHECK_SEC``: no query, no lock."""

    name = "accessctl-watch"

    def __init__(self, database: Path, target: Pacer) -> None:
        super().__init__(target)
        self.paths = [database, Path(f"{database}-wal")]

    def signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self.paths:
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _run(self) -> None:
        last = self.signature()
        while not self._stop.wait(FILE_CHECK_SEC):
            now = self.signature()
            if now != last:
                last = now
                self.pacer.wake()


class WorkListener(Waker):
    """Postgres: ``LISTEN accessctl_work`` on a connection of its own, waking the pacer on
    every notification. After a lost connection it reconnects (backing off to
    ``idle_poll``) and wakes the pacer once, for whatever was filed meanwhile."""

    name = "accessctl-listen"

    def __init__(self, engine: sa.Engine, target: Pacer) -> None:
        super().__init__(target)
        self.engine = engine
        self._conn: Any = None

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # ends the blocking notifies() at once
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.5
        first = True
        warned = False
        while not self._stop.is_set():
            try:
                self._listen(wake_first=not first)
                backoff = 0.5
            except Exception as exc:
                if self._stop.is_set():
                    return
                if backoff >= self.pacer.idle_poll and not warned:
                    warned = True  # a restart passes in seconds; this has lasted longer
                    log.warning(
                        "cannot LISTEN for new work; idle, this process finds it at its "
                        f"{self.pacer.idle_poll:g}-s look instead",
                        error=type(exc).__name__,
                    )
                else:
                    log.debug("work listener reconnecting", error=type(exc).__name__)
            first = False
            if self._stop.wait(backoff):
                return
            backoff = min(self.pacer.idle_poll, backoff * 2)

    def _listen(self, *, wake_first: bool) -> None:
        import psycopg

        # A connection of its own, outside the pool: ``stop`` closes it under the blocked
        # ``notifies`` from another thread, which a pooled connection would log as an error.
        url = self.engine.url.set(drivername="postgresql")
        conn = psycopg.connect(
            url.render_as_string(hide_password=False),
            autocommit=True,
            connect_timeout=5,
            application_name="accessctl-listen",
        )
        try:
            self._conn = conn
            if self._stop.is_set():
                return
            conn.execute(f"LISTEN {PostgresBackend.WORK_CHANNEL}")
            if wake_first:
                self.pacer.wake()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=STOP_CHECK_SEC, stop_after=1):
                    self.pacer.wake()
        finally:
            self._conn = None
            with contextlib.suppress(Exception):
                conn.close()

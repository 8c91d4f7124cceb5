"""Real faults: kill -9, overlapping runs, signals, severed database connections, and the
rate limit measured from the start times DBOS records."""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

import pgcluster
from accessctl.testing.provider import FakeProvider
from conftest import Cli

LIMIT, PERIOD = 5, 0.5


def wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def has_requests(cli: Cli, count: int) -> Callable[[], bool]:
    """A predicate for ``wait_for``: at least ``count`` requests have their row."""
    return lambda: request_count(cli) >= count


def terminal_outcomes(cli: Cli, batch_id: str) -> tuple[int, int, int]:
    """(accesses, errors, distinct request IDs across both) for one batch."""
    bid = batch_id.replace("-", "") if cli.database_url.startswith("sqlite") else batch_id
    accesses = cli.scalar("SELECT count(*) FROM accesses WHERE batch_id = :b", b=bid)
    errors = cli.scalar("SELECT count(*) FROM errors WHERE batch_id = :b", b=bid)
    distinct = cli.scalar(
        "SELECT count(*) FROM (SELECT request_id FROM accesses WHERE batch_id = :b "
        "UNION SELECT request_id FROM errors WHERE batch_id = :b) AS t",
        b=bid,
    )
    return int(accesses), int(errors), int(distinct)


def max_starts_in_window(starts_ms: list[int], period: float) -> int:
    """The most starts in any real window of ``period`` seconds."""
    starts = sorted(starts_ms)
    window = int(period * 1000)
    return max(
        (bisect.bisect_left(starts, s + window) - i for i, s in enumerate(starts)), default=0
    )


def request_starts(cli: Cli) -> list[int]:
    rows = cli.rows(
        f"SELECT started_at_epoch_ms FROM {cli.workflow_table} "
        "WHERE queue_name = 'access-requests' AND started_at_epoch_ms IS NOT NULL"
    )
    return [int(r[0]) for r in rows]


def request_count(cli: Cli) -> int:
    return int(cli.scalar("SELECT count(*) FROM accesses") or 0) + int(
        cli.scalar("SELECT count(*) FROM errors") or 0
    )


def user_args(users: list[str]) -> list[str]:
    return [a for u in users for a in ("--user", u)]


@pytest.mark.slow
def test_rate_limit_holds_and_keeps_pace(cli: Cli) -> None:
    users = cli.add_users(2)
    n = 4 * LIMIT
    started = time.monotonic()
    summary = cli.json("batch", str(n), *user_args(users), "--json")
    elapsed = time.monotonic() - started
    assert summary["recorded"] == n
    starts = request_starts(cli)
    assert len(starts) == n
    assert max_starts_in_window(starts, PERIOD) <= LIMIT
    # The backlog's pace is set by the limiter: first start to last start is at least
    # the bound (N/L - 1) * P.
    span = (max(starts) - min(starts)) / 1000
    assert span >= (n / LIMIT - 1) * PERIOD - 0.01
    assert elapsed < 30


@pytest.mark.slow
def test_rate_limit_holds_across_overlapping_processes(cli: Cli) -> None:
    users = cli.add_users(2)
    runs = [cli.popen("batch", "12", *user_args(users), "--json") for _ in range(3)]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert json.loads(out)["recorded"] == 12
    starts = request_starts(cli)
    assert len(starts) == 36
    assert max_starts_in_window(starts, PERIOD) <= LIMIT


@pytest.mark.slow
@pytest.mark.parametrize("point", ["fan-out", "mid-batch", "after-last-commit"])
def test_kill_9_then_rerun_loses_and_duplicates_nothing(cli: Cli, point: str) -> None:
    users = cli.add_users(3)
    unknown = "99999999-9999-9999-9999-999999999999"
    n = 30
    args = ["batch", str(n), *user_args([*users, unknown]), "--key", f"kill-{point}", "--json"]
    if point == "after-last-commit":
        # The run notices its batch is complete at its next poll: a slow poll keeps it
        # alive long enough after the last row for the kill to land there, not by luck.
        cli.env["ACCESSCTL_POLL_INTERVAL"] = "3"
    proc = cli.popen(*args)
    batch_rows = f"SELECT count(*) FROM {cli.workflow_table} WHERE workflow_uuid LIKE 'batch-%'"
    if point == "fan-out":
        wait_for(lambda: cli.scalar(batch_rows) == 1, what="the batch workflow")
    elif point == "mid-batch":
        wait_for(lambda: request_count(cli) >= n // 2, what="half the batch")
    else:
        wait_for(lambda: request_count(cli) >= n, what="the whole batch")
    proc.kill()
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # Requests cut off mid-flight may have called downstream: their starts must still
    # count against the limiter's window when they run again.
    crashed_starts = [
        int(r[0])
        for r in cli.rows(
            f"SELECT started_at_epoch_ms FROM {cli.workflow_table} WHERE status = 'PENDING' "
            "AND queue_name = 'access-requests' AND started_at_epoch_ms IS NOT NULL"
        )
    ]

    rerun = cli.run(*args)
    assert rerun.returncode == 1, rerun.stderr  # the unknown user's requests failed
    summary = json.loads(rerun.stdout)
    assert summary["total"] == n
    accesses, errors, distinct = terminal_outcomes(cli, summary["batch_id"])
    assert accesses + errors == n == distinct  # none lost, none duplicated
    assert errors == sum(1 for i in range(n) if i % 4 == 3)  # the unknown user's share
    assert (summary["recorded"], summary["failed"]) == (accesses, errors)
    pending = cli.scalar(
        f"SELECT count(*) FROM {cli.workflow_table} WHERE status IN ('PENDING', 'ENQUEUED')"
    )
    assert pending == 0
    assert max_starts_in_window(request_starts(cli) + crashed_starts, PERIOD) <= LIMIT


def writing_now(cli: Cli) -> bool:
    """Whether another process holds an open write transaction on the database."""
    if cli.database_url.startswith("sqlite"):
        conn = sqlite3.connect(cli.database_url.split(":///", 1)[1], timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True  # someone holds the write lock
        finally:
            conn.close()
    busy = cli.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
    )
    return bool(busy)


@pytest.mark.slow
def test_kill_9_while_filing_leaves_the_whole_batch_or_none(cli: Cli) -> None:
    n = 30_000
    args = ["batch", str(n), "--key", "filing-kill", "--detach"]
    proc = cli.popen(*args)
    wait_for(lambda: writing_now(cli), timeout=60, what="the filing transaction")
    proc.kill()
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # Killed inside the one filing transaction: nothing of the batch exists.
    assert cli.scalar("SELECT count(*) FROM batches") == 0
    assert cli.scalar(f"SELECT count(*) FROM {cli.workflow_table}") == 0
    # The same command files it whole, once.
    again = cli.run(*args)
    assert again.returncode == 0, again.stderr
    assert cli.scalar("SELECT count(*) FROM batches") == 1
    assert (
        cli.scalar(f"SELECT count(*) FROM {cli.workflow_table} WHERE status = 'ENQUEUED'") == n + 1
    )


def test_same_key_twice_concurrently_files_one_batch(cli: Cli) -> None:
    users = cli.add_users(2)
    args = ["batch", "15", *user_args(users), "--key", "nightly-2026-11-28", "--json"]
    runs = [cli.popen(*args) for _ in range(2)]
    results = [run.communicate(timeout=120) for run in runs]
    summaries = []
    for run, (out, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err
        summaries.append(json.loads(out))
    assert summaries[0]["batch_id"] == summaries[1]["batch_id"]
    assert cli.scalar("SELECT count(*) FROM accesses") == 15
    assert cli.scalar("SELECT count(*) FROM batches") == 1
    again = cli.json("batch", "15", *user_args(users), "--key", "nightly-2026-11-28", "--json")
    assert again["batch_id"] == summaries[0]["batch_id"]
    assert cli.scalar("SELECT count(*) FROM accesses") == 15


def test_different_keys_concurrently_both_complete_once(cli: Cli) -> None:
    users = cli.add_users(2)
    runs = [
        cli.popen("batch", "12", *user_args(users), "--key", f"k{i}", "--json") for i in range(2)
    ]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert json.loads(out)["recorded"] == 12
    assert cli.scalar("SELECT count(*) FROM accesses") == 24
    assert cli.scalar("SELECT count(DISTINCT request_id) FROM accesses") == 24
    # Every request ran to completion exactly once: one DBOS execution each, no recovery.
    attempts = cli.rows(
        f"SELECT recovery_attempts FROM {cli.workflow_table} WHERE queue_name = 'access-requests'"
    )
    # DBOS counts each dispatch: 1 is a single execution; a recovery would make it 2.
    assert [r[0] for r in attempts] == [1] * 24


def test_invalid_or_blank_key_is_a_usage_error(cli: Cli) -> None:
    for key in ("", "   ", "x" * 201):
        result = cli("batch", "3", "--key", key)
        assert result.exit_code == 2, key
    assert cli.scalar("SELECT count(*) FROM batches") == 0


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_batch_exits_then_rerun_completes(cli: Cli, signum: int, code: int) -> None:
    users = cli.add_users(2)
    args = ["batch", "25", *user_args(users), "--key", f"sig-{signum}", "--json"]
    proc = cli.popen(*args, ACCESSCTL_SHUTDOWN_GRACE="2")
    wait_for(lambda: request_count(cli) >= 5, what="some requests")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "resumes" in err
    # --json: the interruption is one JSON document on stdout as well.
    assert json.loads(out)["exit_code"] == code
    done_at_signal = request_count(cli)
    assert done_at_signal < 25
    rerun = cli.run(*args)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    accesses, errors, distinct = terminal_outcomes(cli, summary["batch_id"])
    assert (accesses, errors, distinct) == (25, 0, 25)


class SilentProvider:
    """A provider that accepts every connection and never answers: each call hangs until
    the provider timeout, so a process has requests in flight for as long as we want."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/access"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed by close()
            while True:
                self.held.append(self._server.accept()[0])

    def close(self) -> None:
        self._server.close()
        for conn in self.held:
            conn.close()


class StderrLines:
    """A child's stderr, read as it comes (a pipe left unread could also block it)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self.lines.extend, args=(proc.stderr,))
        self._thread.start()

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


@pytest.mark.slow
def test_second_signal_exits_at_once_and_loses_nothing(cli: Cli) -> None:
    users = cli.add_users(1)
    args = ["batch", "25", *user_args(users), "--key", "double-signal", "--json"]
    silent = SilentProvider()
    # Requests stuck in calls that take a minute: after the first signal the process
    # would wait for them (up to its 60 s grace), so only the second can end it at once.
    slow = {"ACCESSCTL_PROVIDER_URL": silent.url, "ACCESSCTL_PROVIDER_TIMEOUT": "60"}
    try:
        proc = cli.popen(*args, ACCESSCTL_SHUTDOWN_GRACE="60", **slow)
        stderr = StderrLines(proc)
        wait_for(lambda: len(silent.held) >= 3, what="calls in flight")
        proc.send_signal(signal.SIGTERM)
        # The first signal must be handled before the second is sent (two pending
        # SIGTERMs are one): the shutdown that follows logs that it waits for requests.
        wait_for(
            lambda: any("waiting for in-flight requests" in line for line in stderr.lines),
            what="the shutdown's wait",
        )
        assert proc.poll() is None  # draining: waiting for the calls in flight
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - sent < 5
        assert proc.returncode == 143
        assert "second signal, exiting now" in stderr.text()
    finally:
        silent.close()
    # The process is gone, so its calls are too: a short call timeout lets the rerun
    # adopt its requests on Postgres after 7 s instead of 15 (the grace covers a call).
    with FakeProvider() as provider:
        rerun = cli.run(*args, ACCESSCTL_PROVIDER_URL=provider.url, ACCESSCTL_PROVIDER_TIMEOUT="2")
    assert rerun.returncode == 0, rerun.stderr
    accesses, errors, distinct = terminal_outcomes(cli, json.loads(rerun.stdout)["batch_id"])
    assert (accesses, errors, distinct) == (25, 0, 25)


@pytest.mark.slow
def test_backends_terminated_mid_batch_are_retried_not_recorded(cli: Cli, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("severing server connections is a Postgres fault")
    import sqlalchemy as sa

    from conftest import POSTGRES_URL

    users = cli.add_users(2)
    dbname = sa.make_url(cli.database_url).database
    proc = cli.popen("batch", "30", *user_args(users), "--json")
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    kills = 0
    try:
        for threshold in (5, 12, 20):
            wait_for(has_requests(cli, threshold), what=f"{threshold} requests")
            with admin.connect() as conn:
                kills += (
                    conn.execute(
                        sa.text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = :d AND pid <> pg_backend_pid()"
                        ),
                        {"d": dbname},
                    ).scalar()
                    or 0
                )
    finally:
        admin.dispose()
    out, err = proc.communicate(timeout=120)
    assert kills > 0
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert (summary["recorded"], summary["failed"]) == (30, 0)
    assert cli.scalar("SELECT count(*) FROM errors") == 0
    assert cli.scalar("SELECT count(*) FROM accesses") == 30


@pytest.mark.slow
def test_three_workers_share_one_global_limit(cli: Cli, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("several hosts share Postgres; SQLite is one host (covered above)")
    users = cli.add_users(2)
    # Each takes one request at a time, and all three are up before the work is filed:
    # otherwise the first to start could take every slot of every window alone.
    workers = [cli.popen("worker", ACCESSCTL_WORKER_CONCURRENCY="1") for _ in range(3)]
    logs = [Lines(w) for w in workers]
    try:
        for log in logs:
            wait_for(functools.partial(log.has, "worker started"), what="a worker up")
        detached = cli("batch", "30", *user_args(users), "--detach")
        assert detached.exit_code == 0, detached.stderr
        batch_id = detached.stdout.strip()
        done = lambda: cli.json("status", batch_id, "--json")["state"] == "done"  # noqa: E731
        wait_for(done, timeout=120, what="the batch done")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.communicate(timeout=60)
    for w, log in zip(workers, logs, strict=True):
        assert w.returncode == 143, log.text()
    status = cli.json("status", batch_id, "--json")
    assert (status["state"], status["recorded"]) == ("done", 30)
    starts = request_starts(cli)
    assert len(starts) == 30
    assert max_starts_in_window(starts, PERIOD) <= LIMIT
    executors = cli.rows(
        f"SELECT DISTINCT executor_id FROM {cli.workflow_table} WHERE queue_name = 'access-requests'"
    )
    assert len(executors) >= 2  # the work really was shared


def test_read_only_commands_never_execute_work(cli: Cli) -> None:
    users = cli.add_users(1)
    detached = cli("submit", *users, "--detach")
    batch_id = detached.stdout.strip()
    for command in (["errors"], ["status", batch_id], ["config"], ["users", "list"]):
        assert cli(*command).exit_code == 0
    assert cli.scalar("SELECT count(*) FROM accesses") == 0
    state = cli.scalar(
        f"SELECT status FROM {cli.workflow_table} WHERE workflow_uuid = :w", w=f"batch-{batch_id}"
    )
    assert state == "ENQUEUED"


@pytest.mark.slow
def test_runs_killed_repeatedly_still_finish(cli: Cli) -> None:
    """Three kills in a row at different depths, then one clean run."""
    users = cli.add_users(2)
    args = ["batch", "40", *user_args(users), "--key", "repeated", "--json"]
    for threshold in (3, 15, 30):
        proc = cli.popen(*args)
        wait_for(has_requests(cli, threshold), what=f"{threshold} requests")
        proc.kill()
        proc.wait(timeout=10)
    rerun = cli.run(*args)
    assert rerun.returncode == 0, rerun.stderr
    accesses, errors, distinct = terminal_outcomes(cli, json.loads(rerun.stdout)["batch_id"])
    assert (accesses, errors, distinct) == (40, 0, 40)


@pytest.mark.slow
def test_burst_worker_after_kill_9_finishes_the_dead_process_work(cli: Cli) -> None:
    """The dead process's running work is adopted only after the grace: a burst worker
    started right after the kill must wait for it, not exit with the batch unfinished."""
    users = cli.add_users(2)
    proc = cli.popen("batch", "30", *user_args(users), "--key", "burst-after-kill", "--json")
    wait_for(lambda: request_count(cli) >= 10, what="a third of the batch")
    proc.kill()
    proc.wait(timeout=10)
    orphaned = f"SELECT count(*) FROM {cli.workflow_table} WHERE status = 'PENDING'"
    assert cli.scalar(orphaned) >= 1  # at least the batch workflow it was following
    worker = cli.run("worker", "--burst", timeout=120)
    assert worker.returncode == 0, worker.stderr
    batch_id = str(cli.scalar("SELECT id FROM batches"))
    if len(batch_id) == 32:  # SQLite keeps UUIDs as bare hex
        batch_id = (
            f"{batch_id[:8]}-{batch_id[8:12]}-{batch_id[12:16]}-{batch_id[16:20]}-{batch_id[20:]}"
        )
    assert terminal_outcomes(cli, batch_id) == (30, 0, 30)
    left = f"SELECT count(*) FROM {cli.workflow_table} WHERE status IN ('PENDING', 'ENQUEUED')"
    assert cli.scalar(left) == 0


@pytest.fixture
def own_postgres() -> Iterator[pgcluster.Cluster]:
    """A PostgreSQL cluster this test may restart (never the shared one)."""
    why_not = pgcluster.available()
    if why_not:
        pytest.skip(why_not)
    cluster = pgcluster.Cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


class Lines:
    """A process's stderr, collected line by line as it comes (so the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True
        )
        self._thread.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


@pytest.mark.slow
def test_database_restart_runs_every_request_once(own_postgres: pgcluster.Cluster) -> None:
    """Two workers with requests in flight at a slow provider, the limit lifted, and
    ``pg_ctl restart -m fast``: both lose their leases. Neither may run the other's work
    while it is still running it: the provider sees each request exactly once."""
    n = 80
    tool = Cli(own_postgres.url, env={"ACCESSCTL_RATE_LIMIT": "none"})
    assert tool("migrate").exit_code == 0
    users = tool.add_users(4)
    # Calls take 2 s, so the restart finds calls in flight and they are still in flight
    # when another process could adopt them.
    with FakeProvider(delay=2.0) as provider:
        tool.env.update(
            ACCESSCTL_PROVIDER_URL=provider.url,
            ACCESSCTL_PROVIDER_TIMEOUT="4",
            ACCESSCTL_CONCURRENCY="10",
            # No cap: once both are up each takes its part, five of the ten
            # (dbos_compat.share_of), so both run requests when the server restarts.
        )
        filed = tool("batch", str(n), *user_args(users), "--detach")
        assert filed.exit_code == 0, filed.stderr
        workers = [tool.popen("worker") for _ in range(2)]
        logs = [Lines(w) for w in workers]
        try:
            running = (
                f"SELECT count(DISTINCT executor_id) FROM {tool.workflow_table} "
                "WHERE status = 'PENDING' AND queue_name = 'access-requests'"
            )
            wait_for(lambda: tool.scalar(running) == 2, what="both workers running requests")
            own_postgres.restart()
            for index, log in enumerate(logs):
                # Generous: on a loaded machine a worker's first check after the restart
                # can wait on the server coming back (seen once at load average 8).
                try:
                    wait_for(
                        functools.partial(log.has, "executor lease lost"),
                        timeout=120,
                        what=f"worker {index}'s lease loss",
                    )
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; its log:\n{''.join(log.lines[-40:])}") from None
            wait_for(lambda: request_count(tool) >= n, timeout=180, what="every request")
            for log in logs:
                wait_for(
                    functools.partial(log.has, "executor lease re-acquired"),
                    what="the lease back",
                )
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.communicate(timeout=60)
        calls = list(provider.calls)
    errs = [log.text() for log in logs]
    for w, err in zip(workers, errs, strict=True):
        assert w.returncode == 143, err
        assert "Traceback" not in err
    keys = Counter(c.key for c in calls)
    twice = {k: v for k, v in keys.items() if v > 1}
    assert not twice, f"called more than once: {twice}"
    assert len(calls) == n
    assert tool.scalar("SELECT count(*) FROM errors") == 0, tool.rows("SELECT message FROM errors")
    assert tool.scalar("SELECT count(DISTINCT request_id) FROM accesses") == n
    assert tool.scalar("SELECT count(*) FROM accesses") == n
    assert set(keys) == {r[0] for r in tool.rows("SELECT request_id FROM accesses")}

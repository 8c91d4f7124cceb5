"""The shared rate limit (limits.py): stored in the database, set on purpose, followed by every
process, and never changed by an ad-hoc run."""

from __future__ import annotations

import json
import signal

import pytest

from accessctl.testing.provider import Call, FakeProvider
from conftest import FAST_LIMIT, Cli
from test_faults import max_starts_in_window, request_starts, user_args, wait_for


def limit_of(cli: Cli) -> dict[str, object]:
    shown = cli("limit", "show", "--json")
    assert shown.exit_code == 0, shown.stderr
    result: dict[str, object] = json.loads(shown.stdout)
    return result


def test_migrate_stores_the_configured_limit_and_records_who(cli: Cli) -> None:
    shown = limit_of(cli)
    assert shown["rate_limit"] == FAST_LIMIT
    assert shown["concurrency"] == 10
    assert shown["reason"] == "migrate"
    assert "@" in str(shown["changed_by"]) and shown["changed_at"]
    # The stored row is DBOS's queue row: what every queue thread re-reads.
    row = cli.rows(
        f"SELECT rate_limit_max, rate_limit_period_sec, concurrency FROM "
        f"{cli.workflow_table.replace('workflow_status', 'queues')} WHERE name = 'access-requests'"
    )
    assert [tuple(r) for r in row] == [(5, 0.5, 10)]


def test_a_run_with_another_limit_is_refused_and_changes_nothing(cli: Cli) -> None:
    users = cli.add_users(1)
    for flags, args in (
        (["--rate-limit", "1000/1"], ["submit", users[0]]),
        (["--rate-limit", "none"], ["batch", "3", "--user", users[0], "--detach"]),
        (["--concurrency", "50"], ["submit", users[0], "--detach"]),
        (["--rate-limit", "1000/1"], ["worker", "--burst"]),
    ):
        result = cli(*flags, *args)
        assert result.exit_code == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("accessctl: error: "), result.stderr
        assert "accessctl limit set" in lines[0] and flags[0] in lines[0]
        assert flags[1] in lines[0]  # the configured value
        stored = FAST_LIMIT if flags[0] == "--rate-limit" else "10"
        assert stored in lines[0]  # and the stored one
    assert cli.scalar("SELECT count(*) FROM batches") == 0
    assert limit_of(cli)["rate_limit"] == FAST_LIMIT
    assert cli.scalar("SELECT count(*) FROM limit_changes") == 1


def test_a_run_without_a_limit_of_its_own_follows_the_stored_one(cli: Cli) -> None:
    users = cli.add_users(1)
    assert cli("limit", "set", "7/0.5", "--concurrency", "3").exit_code == 0
    # The stored value holds for a run that names none (as from cron with a bare env).
    cli.env["ACCESSCTL_RATE_LIMIT"] = ""
    result = cli("batch", "14", "--user", users[0], "--json")
    assert result.exit_code == 0, result.stderr
    starts = request_starts(cli)
    assert len(starts) == 14
    assert max_starts_in_window(starts, 0.5) <= 7
    shown = limit_of(cli)
    assert (shown["rate_limit"], shown["concurrency"], shown["reason"]) == ("7/0.5", 3, "limit set")
    assert cli.scalar("SELECT count(*) FROM limit_changes") == 2


def test_limit_set_refuses_nonsense_with_one_line(cli: Cli) -> None:
    for args in (["limit", "set"], ["limit", "set", "fast"], ["limit", "set", "0/1"]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "accessctl: error:" in result.stderr
    assert limit_of(cli)["rate_limit"] == FAST_LIMIT


@pytest.mark.slow
def test_limit_set_reaches_a_running_worker_and_an_ad_hoc_run_cannot(cli: Cli) -> None:
    """A worker at the stored limit, a one-off run with another limit beside it (refused),
    and a `limit set` while the worker runs: no window of the worker's starts ever holds
    more than the stored limit of that time."""
    users = cli.add_users(2)
    assert cli("limit", "set", "2/1").exit_code == 0
    cli.env["ACCESSCTL_RATE_LIMIT"] = "2/1"
    worker = cli.popen("worker")
    try:
        ad_hoc = cli("--rate-limit", "1000/1", "batch", "6", *user_args(users))
        assert ad_hoc.exit_code == 2
        assert cli("batch", "6", *user_args(users), "--detach").exit_code == 0
        wait_for(lambda: len(request_starts(cli)) == 6, timeout=30, what="the first batch")
        first = request_starts(cli)
        assert max_starts_in_window(first, 1.0) <= 2, sorted(first)
        # Loosen the limit while the worker runs: it follows within one poll.
        assert cli("limit", "set", "6/1").exit_code == 0
        cli.env["ACCESSCTL_RATE_LIMIT"] = "6/1"
        assert cli("batch", "12", *user_args(users), "--detach").exit_code == 0
        wait_for(lambda: len(request_starts(cli)) == 18, timeout=30, what="the second batch")
        second = sorted(set(request_starts(cli)) - set(first))
        assert max_starts_in_window(second, 1.0) <= 6, second
        # Faster than the old limit allows: 12 starts at 2/1 need at least 5 s.
        assert (second[-1] - second[0]) / 1000 < 5.0, second
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    assert cli.scalar("SELECT count(*) FROM accesses") == 18


def test_the_embedded_default_stores_its_limit_on_the_first_run() -> None:
    """A fresh embedded SQLite database gets the configured limit on its first run and
    refuses another one after that, like a shared database."""
    tool = Cli("")
    env = {"ACCESSCTL_DATABASE_URL": ""}
    first = tool("submit", "--json", **env)
    assert first.exit_code == 1, first.stderr  # the seed users are unknown
    assert json.loads(tool("limit", "show", "--json", **env).stdout)["rate_limit"] == FAST_LIMIT
    again = tool("--rate-limit", "9/1", "submit", "--json", **env)
    assert again.exit_code == 2 and "limit set" in again.stderr


def _most_calls_at_once(calls: list[Call]) -> int:
    edges = sorted([(c.arrived, 1) for c in calls] + [(c.finished, -1) for c in calls])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_a_process_takes_no_more_than_its_own_share(cli: Cli) -> None:
    """ACCESSCTL_WORKER_CONCURRENCY caps this process's requests in flight below the
    shared concurrency (10); without it the same run has more at once."""
    users = cli.add_users(2)
    seen = {}
    for cap in ("2", ""):
        with FakeProvider(delay=0.4) as provider:
            done = cli(
                "batch", "12", *user_args(users), "--json",
                ACCESSCTL_RATE_LIMIT="none",
                ACCESSCTL_PROVIDER_URL=provider.url,
                ACCESSCTL_WORKER_CONCURRENCY=cap,
            )  # fmt: skip
            assert done.exit_code == 0, done.stderr
            assert json.loads(done.stdout)["recorded"] == 12
            seen[cap] = _most_calls_at_once(list(provider.calls))
    assert seen["2"] == 2, seen
    assert seen[""] > 2, seen

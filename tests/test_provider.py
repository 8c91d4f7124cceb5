"""Provisioning through a real HTTP provider (the fake one, on loopback)."""

from __future__ import annotations

import itertools
import json
import signal
from collections import Counter

import pytest

from accessctl.testing.provider import FakeProvider
from conftest import Cli
from test_faults import max_starts_in_window, wait_for


def user_args(users: list[str]) -> list[str]:
    return [a for u in users for a in ("--user", u)]


def provider_env(provider: FakeProvider, **extra: str) -> dict[str, str]:
    return {"ACCESSCTL_PROVIDER_URL": provider.url, **extra}


@pytest.mark.slow
def test_provider_calls_stay_under_the_limit_and_map_to_one_row(cli: Cli) -> None:
    users = cli.add_users(3)
    with FakeProvider(reject_users={users[2]}) as provider:
        result = cli(
            "batch",
            "60",
            *user_args(users),
            "--json",
            ACCESSCTL_RATE_LIMIT="10/2",
            **provider_env(provider),
        )
        calls = list(provider.calls)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["recorded"], summary["failed"]) == (60, 0)
    arrivals = [int(c.arrived * 1000) for c in calls]
    t0 = min(c.arrived for c in calls)
    trace = sorted((round(c.arrived - t0, 3), (c.key or "")[-9:]) for c in calls)
    assert max_starts_in_window(arrivals, 2.0) <= 10, trace
    keys = Counter(c.key for c in calls)
    rows = cli.rows("SELECT request_id, status FROM accesses")
    assert len(rows) == 60
    assert {r[0] for r in rows} == set(keys)  # each key maps to exactly one row
    statuses = Counter(r[1] for r in rows)
    assert statuses == {"approved": 40, "rejected": 20}
    assert all(c.answered == 200 for c in calls)


@pytest.mark.slow
def test_429_with_retry_after_is_retried_with_backoff(cli: Cli) -> None:
    users = cli.add_users(2)
    with FakeProvider(fail=[(429, 2)], retry_after=0.3) as provider:
        result = cli(
            "batch",
            "4",
            *user_args(users),
            "--json",
            ACCESSCTL_RATE_LIMIT="50/1",
            **provider_env(provider),
        )
        calls = list(provider.calls)
    assert result.exit_code == 0, result.stderr
    assert cli.scalar("SELECT count(*) FROM errors") == 0
    assert cli.scalar("SELECT count(*) FROM accesses WHERE status = 'approved'") == 4
    by_key: dict[str, list[float]] = {}
    for call in calls:
        by_key.setdefault(str(call.key), []).append(call.arrived)
    assert len(by_key) == 4
    for arrivals in by_key.values():
        assert len(arrivals) == 3  # 429, 429, 200: the same key every time
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert min(gaps) >= 0.3 - 0.02  # Retry-After honoured


def test_exhausted_retries_are_recorded_once(cli: Cli) -> None:
    users = cli.add_users(1)
    with FakeProvider(fail=[(503, 100)]) as provider:
        result = cli(
            "batch",
            "2",
            *user_args(users),
            "--json",
            ACCESSCTL_RATE_LIMIT="50/1",
            ACCESSCTL_PROVIDER_MAX_ATTEMPTS="3",
            **provider_env(provider),
        )
        calls = list(provider.calls)
    assert result.exit_code == 1, result.stderr
    assert len(calls) == 6
    errors = cli.json("errors", "--json")
    assert len(errors) == 2
    assert {e["message"]["error_class"] for e in errors} == {"ProviderUnavailable"}
    assert {e["message"]["http_status"] for e in errors} == {503}


def test_provider_refusal_is_a_domain_error_for_exactly_those_users(cli: Cli) -> None:
    users = cli.add_users(3)
    with FakeProvider(refuse_users={users[1]}) as provider:
        result = cli("batch", "9", *user_args(users), "--json", **provider_env(provider))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["recorded"], summary["failed"]) == (6, 3)
    errors = cli.json("errors", "--json")
    assert len(errors) == 3
    assert {e["message"]["user_id"] for e in errors} == {users[1]}
    assert {e["message"]["http_status"] for e in errors} == {400}
    assert {e["message"]["error_class"] for e in errors} == {"ProviderRefused"}


def test_token_is_sent_but_never_shown_or_stored(cli: Cli) -> None:
    users = cli.add_users(1)
    token = "tok-SENTINEL-8c1f"
    with FakeProvider(expected_token=token) as provider:
        env = provider_env(provider, ACCESSCTL_PROVIDER_TOKEN=token)
        done = cli.run("-v", "batch", "3", *user_args(users), "--json", timeout=120, **env)
        config = cli("config", "--json", **env)
        calls = list(provider.calls)
    assert done.returncode == 0, done.stderr
    assert all(c.answered == 200 and c.authorization for c in calls)
    assert token not in done.stdout + done.stderr + config.stdout + config.stderr
    assert json.loads(config.stdout)["provider_token"] == "(set)"
    for table in ("accesses", "errors", "batches"):
        for row in cli.rows(f"SELECT * FROM {table}"):
            assert token not in str(row)
    for row in cli.rows(f"SELECT * FROM {cli.workflow_table}"):
        assert token not in str(row)


@pytest.mark.slow
def test_kill_9_with_provider_then_rerun_reuses_keys(cli: Cli) -> None:
    users = cli.add_users(2)
    with FakeProvider() as provider:
        # A short call timeout: on Postgres the rerun adopts the dead run's requests once
        # its lease has been free for the fence plus the longest call (docs/operations.md).
        env = provider_env(provider, ACCESSCTL_RATE_LIMIT="10/1", ACCESSCTL_PROVIDER_TIMEOUT="2")
        args = ["batch", "30", *user_args(users), "--key", "provider-kill", "--json"]
        proc = cli.popen(*args, **env)
        wait_for(lambda: len(provider.calls) >= 12, what="a dozen provider calls")
        proc.kill()
        proc.wait(timeout=10)  # dead: it makes no more calls, and its locks are gone
        assert proc.returncode == -signal.SIGKILL
        rerun = cli.run(*args, timeout=120, **env)
        calls = list(provider.calls)
    assert rerun.returncode == 0, rerun.stderr
    rows = cli.rows("SELECT request_id FROM accesses")
    assert len(rows) == 30 and len({r[0] for r in rows}) == 30
    keys = {c.key for c in calls}
    assert keys == {r[0] for r in rows}  # replays reuse the request's own key
    t0 = min(c.arrived for c in calls)
    trace = sorted((round(c.arrived - t0, 3), (c.key or "")[-12:]) for c in calls)
    assert max_starts_in_window([int(c.arrived * 1000) for c in calls], 1.0) <= 10, trace


def test_accesses_lifecycle_by_hand(cli: Cli) -> None:
    users = cli.add_users(1)
    cli.json("batch", "3", *user_args(users), "--json")
    listed = cli.json("accesses", "list", "--json", "--status", "requested")
    assert len(listed) == 3
    first, second, third = (a["id"] for a in listed)
    assert cli("accesses", "approve", first).exit_code == 0
    assert cli("accesses", "reject", second).exit_code == 0
    assert cli("accesses", "cancel", first).exit_code == 0  # approved -> canceled
    illegal = cli("accesses", "approve", third, second)
    assert illegal.exit_code == 2 and "is rejected" in illegal.stderr
    states = {a["id"]: a["status"] for a in cli.json("accesses", "list", "--json")}
    assert states == {first: "canceled", second: "rejected", third: "requested"}
    assert cli.json("accesses", "list", "--json", "--user", users[0])
    assert cli("accesses", "list", "--status", "bogus").exit_code == 2

"""Replay, proven in-process, as dbos-transact-py's own tests do: DBOS launched in the test
process (``runtime.executing_runtime``) on a migrated database, one request filed against a
fake provider and run to its end, then the same stored workflow executed again by its ID.
Whatever re-runs, the request has exactly one row and the provider exactly one call: the
call is a checkpointed step, and each transaction looks for its request's row first."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import sqlalchemy as sa
from dbos import DBOS

from accessctl import workflows
from accessctl.batches import BatchRequest, retry_policy
from accessctl.filing import file_batch
from accessctl.logs import configure_logging
from accessctl.runtime import Runtime, executing_runtime
from accessctl.settings import resolve_settings
from accessctl.testing.provider import FakeProvider
from conftest import Cli, punctual_starts


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def runtime(
    cli: Cli, provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    """DBOS running in this process as an executor, on the test's migrated database.
    Every start counts as punctual; lateness has a test of its own (it patches again)."""
    punctual_starts(monkeypatch)
    # As the CLI does first: DBOS's logger would otherwise still write to the stream of
    # the last CliRunner invocation, which is closed.
    configure_logging("json")
    settings = resolve_settings(
        env={
            "ACCESSCTL_DATABASE_URL": cli.database_url,
            "ACCESSCTL_PROVIDER_URL": provider.url,
            "ACCESSCTL_POLL_INTERVAL": "0.05",
            "ACCESSCTL_SHUTDOWN_GRACE": "3",
        }
    )
    with executing_runtime(settings) as rt:
        yield rt


def file_one(rt: Runtime, user_id: str) -> tuple[str, str]:
    """File a batch of one request and wait for it: (batch ID, request ID)."""
    request = BatchRequest(user_ids=[user_id], invalid=[], key=None)
    assert file_batch(rt.client, rt.engine, request, retry_policy(rt.settings))
    summary: workflows.Summary = DBOS.retrieve_workflow(
        workflows.batch_workflow_id(request.batch_id)
    ).get_result()
    assert (summary["recorded"], summary["failed"]) == (1, 0)
    return request.batch_id, workflows.request_workflow_id(request.batch_id, 0)


def access_rows(rt: Runtime) -> list[tuple[Any, ...]]:
    with rt.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT request_id, status FROM accesses"))]


def run_again(cli: Cli, rt: Runtime, workflow_id: str) -> Any:
    """Execute a finished workflow again from its recorded steps. DBOS resumes only a
    workflow that did not succeed, so its status is set back first, as a crash before its
    end would have left it; resuming then replays it from the start."""
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {cli.workflow_table} SET status = 'CANCELLED' WHERE workflow_uuid = :w"
            ),
            {"w": workflow_id},
        )
    return DBOS.resume_workflow(workflow_id).get_result()


def test_a_replayed_request_writes_and_calls_nothing_twice(
    cli: Cli, runtime: Runtime, provider: FakeProvider
) -> None:
    [user] = cli.add_users(1)
    _, rid = file_one(runtime, user)
    first: dict[str, Any] = DBOS.retrieve_workflow(rid).get_result()
    assert first == {"outcome": "recorded", "attempt": 1}
    assert access_rows(runtime) == [(rid, "approved")]
    assert [c.key for c in provider.calls] == [rid]

    # The whole workflow again: its first transaction finds the row and stops there.
    assert run_again(cli, runtime, rid) == first
    assert access_rows(runtime) == [(rid, "approved")]
    assert [c.key for c in provider.calls] == [rid]


def test_a_replay_after_the_call_but_before_the_row_uses_the_checkpointed_answer(
    cli: Cli, runtime: Runtime, provider: FakeProvider
) -> None:
    [user] = cli.add_users(1)
    _, rid = file_one(runtime, user)
    # A crash between the provider step and the transaction recording its answer leaves
    # the step's checkpoint and no row: that is this database once the row is gone.
    with runtime.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM accesses"))
    assert run_again(cli, runtime, rid) == {"outcome": "recorded", "attempt": 1}
    # The row is written from the recorded answer; the provider is not called again.
    assert access_rows(runtime) == [(rid, "approved")]
    assert [c.key for c in provider.calls] == [rid]


def test_a_late_start_goes_back_through_the_queue_without_calling(
    cli: Cli, runtime: Runtime, provider: FakeProvider
) -> None:
    [user] = cli.add_users(1)
    real = workflows._attempt_state
    seen: list[str] = []

    def first_start_is_late(workflow_id: str) -> tuple[float, bool]:
        # The real read of the start on the database's clock; the first try's thread is
        # taken to have been paused for 10 s after the limiter admitted it.
        seen.append(workflow_id)
        since_start, owned = real(workflow_id)
        return since_start + (10.0 if len(seen) == 1 else 0.0), owned

    with mock.patch.object(workflows, "_attempt_state", first_start_is_late):
        _, rid = file_one(runtime, user)
    assert seen == [rid, f"{rid}.t2"]
    # The late try called nobody and spent no attempt: the next try is attempt 1 again.
    assert DBOS.retrieve_workflow(rid).get_result() == {"outcome": "requeued", "attempt": 1}
    assert DBOS.retrieve_workflow(f"{rid}.t2").get_result() == {
        "outcome": "recorded",
        "attempt": 1,
    }
    assert [c.key for c in provider.calls] == [rid]
    assert access_rows(runtime) == [(rid, "approved")]

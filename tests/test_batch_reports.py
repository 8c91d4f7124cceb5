"""Batch reports that never lie: states (batch_state.py), cancel, prune, keys bound to their
input, and times with an offset, on both backends."""

from __future__ import annotations

import json
import signal
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from conftest import SEED, Cli
from test_faults import terminal_outcomes, user_args, wait_for


def state_of(cli: Cli, batch_id: str) -> dict[str, object]:
    status = cli("status", batch_id, "--json")
    assert status.exit_code == 0, status.stderr
    report: dict[str, object] = json.loads(status.stdout)
    listed = {b["batch_id"]: b for b in cli.json("batches", "--json")}
    assert listed[batch_id]["state"] == report["state"]  # one definition, two commands
    return report


def cancel_from_outside(cli: Cli, workflow_id: str) -> None:
    """Cancel a workflow the way the ``dbos`` CLI would: through DBOS's own client."""
    from dbos import DBOSClient

    client = DBOSClient(
        system_database_url=cli.database_url.replace("postgresql+psycopg", "postgresql"),
        application_name="accessctl",
    )
    try:
        client.cancel_workflow(workflow_id)
    finally:
        client.destroy()


def dbos_count(cli: Cli, where: str, **params: object) -> int:
    return int(cli.scalar(f"SELECT count(*) FROM {cli.workflow_table} WHERE {where}", **params))


# --- prune ----------------------------------------------------------------------------------


def test_prune_keeps_every_report_true(cli: Cli) -> None:
    users = cli.add_users(1)
    failing = cli("submit", *SEED, "--key", "nightly", "--json")
    assert failing.exit_code == 1
    batch_id = json.loads(failing.stdout)["batch_id"]
    fine = cli.json("submit", users[0], "--json")
    before = {b["batch_id"]: b for b in cli.json("batches", "--json")}
    future = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    pruned = cli("prune", "--older-than", future, "--json")
    assert pruned.exit_code == 0, pruned.stderr
    removed = json.loads(pruned.stdout)
    assert removed["batches"] == 2 and removed["errors"] == 4
    # Everything it was counted from is gone ...
    assert cli.scalar("SELECT count(*) FROM errors") == 0
    assert dbos_count(cli, "workflow_uuid LIKE :p", p=f"%{batch_id}%") == 0
    # ... and the reports are what they were.
    after = {b["batch_id"]: b for b in cli.json("batches", "--json")}
    assert after == before
    report = state_of(cli, batch_id)
    assert (report["total"], report["recorded"], report["failed"], report["state"]) == (
        4,
        0,
        4,
        "done",
    )
    assert state_of(cli, fine["batch_id"])["recorded"] == 1
    # A rerun of the pruned key reports the batch as it ended: failures, exit 1.
    rerun = cli("submit", *SEED, "--key", "nightly", "--json")
    assert rerun.exit_code == 1, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["batch_id"], summary["total"], summary["failed"]) == (batch_id, 4, 4)
    assert cli.scalar("SELECT count(*) FROM batches") == 2  # nothing filed again


def test_prune_dry_run_and_offsets_mean_the_same_instant(cli: Cli) -> None:
    cli("submit", *SEED, "--json")
    created = datetime.fromisoformat(cli.json("errors", "--json")[0]["created_at"])
    for hours in (-5, 9):
        zone = timezone(timedelta(hours=hours))
        # One minute before the rows: nothing is older; one minute after: all four are.
        before = (created - timedelta(minutes=1)).astimezone(zone).isoformat()
        after = (created + timedelta(minutes=1)).astimezone(zone).isoformat()
        assert len(cli.json("errors", "--since", before, "--json")) == 4, before
        assert cli.json("errors", "--since", after, "--json") == [], after
        counted = cli.json("prune", "--older-than", before, "--dry-run", "--json")
        assert counted["errors"] == 0, before
        counted = cli.json("prune", "--older-than", after, "--dry-run", "--json")
        assert counted["errors"] == 4, after
    assert cli.scalar("SELECT count(*) FROM errors") == 4  # dry runs remove nothing


def test_prune_names_its_own_option_in_errors(cli: Cli) -> None:
    result = cli("prune", "--older-than", "bogus")
    assert result.exit_code == 2
    assert "--older-than" in result.stderr and "--since" not in result.stderr


# --- states and cancel ----------------------------------------------------------------------


def test_a_detached_batch_nobody_picked_up_is_queued_and_cancel_ends_it(cli: Cli) -> None:
    users = cli.add_users(2)
    batch_id = cli("batch", "6", *user_args(users), "--detach").stdout.strip()
    assert state_of(cli, batch_id)["state"] == "queued"
    cancelled = cli("cancel", batch_id, "--json")
    assert cancelled.exit_code == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancelled"] == 6
    report = state_of(cli, batch_id)
    assert (report["recorded"], report["failed"], report["state"]) == (0, 6, "cancelled")
    classes = {e["message"]["error_class"] for e in cli.json("errors", "--json")}
    assert classes == {"Cancelled"}
    # Nothing of it is left to run: a worker finds no work, files nothing.
    assert dbos_count(cli, "status IN ('ENQUEUED', 'PENDING', 'DELAYED')") == 0
    worker = cli.run("worker", "--burst", timeout=60)
    assert worker.returncode == 0, worker.stderr
    assert cli.scalar("SELECT count(*) FROM accesses") == 0
    # Cancelling again is harmless; retry files each cancelled request again.
    again = cli.json("cancel", batch_id, "--json")
    assert again["cancelled"] == 0 and again["state"] == "cancelled"
    dry = cli.json("retry", batch_id, "--dry-run", "--json")
    assert sorted(r["user_id"] for r in dry) == sorted(users * 3)


@pytest.mark.slow
def test_cancel_stops_a_running_batch_and_lets_in_flight_requests_finish(cli: Cli) -> None:
    users = cli.add_users(2)
    assert cli("limit", "set", "2/0.5").exit_code == 0
    cli.env["ACCESSCTL_RATE_LIMIT"] = "2/0.5"
    proc = cli.popen("batch", "40", *user_args(users), "--key", "big-mistake", "--json")
    batch_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "accessctl:batch-key:big-mistake"))
    try:
        wait_for(
            lambda: (cli.scalar("SELECT count(*) FROM accesses") or 0) >= 4,
            timeout=60,
            what="some requests recorded",
        )
        cancelled = cli("cancel", batch_id, "--json")
        assert cancelled.exit_code == 0, cancelled.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert proc.returncode == 1, err  # some requests did not happen
    summary = json.loads(out)
    assert summary["state"] == "cancelled"
    accesses, errors, distinct = terminal_outcomes(cli, batch_id)
    assert accesses + errors == distinct == 40  # every request exactly one row
    assert 4 <= accesses < 40 and summary["recorded"] == accesses
    report = state_of(cli, batch_id)
    assert (report["state"], report["failed"]) == ("cancelled", errors)
    assert dbos_count(cli, "status IN ('ENQUEUED', 'PENDING', 'DELAYED')") == 0


def test_a_batch_whose_follower_was_cancelled_is_done_once_its_requests_are(cli: Cli) -> None:
    users = cli.add_users(1)
    batch_id = cli("batch", "3", *user_args(users), "--detach").stdout.strip()
    cancel_from_outside(cli, f"batch-{batch_id}")
    worker = cli.run("worker", "--burst", timeout=60)
    assert worker.returncode == 0, worker.stderr
    report = state_of(cli, batch_id)
    assert (report["recorded"], report["state"]) == (3, "done")


@pytest.mark.slow
def test_interrupted_means_its_process_died(cli: Cli) -> None:
    users = cli.add_users(1)
    proc = cli.popen("batch", "30", *user_args(users), "--key", "dies", "--json")
    batch_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "accessctl:batch-key:dies"))
    wait_for(
        lambda: (cli.scalar("SELECT count(*) FROM accesses") or 0) >= 2,
        timeout=60,
        what="the run to start",
    )
    # Its requests can be claimed before its follower: this test is about the follower's
    # process dying, so it waits until the follower runs (on a loaded machine, seen not to).
    wait_for(
        lambda: dbos_count(cli, "workflow_uuid = :w AND status = 'PENDING'", w=f"batch-{batch_id}")
        == 1,
        timeout=60,
        what="the follower to run",
    )
    assert state_of(cli, batch_id)["state"] == "running"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert state_of(cli, batch_id)["state"] == "interrupted"
    rerun = cli.run("batch", "30", *user_args(users), "--key", "dies", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert state_of(cli, batch_id)["state"] == "done"


def test_a_run_that_died_before_its_follower_was_claimed_is_interrupted(cli: Cli) -> None:
    """A run's requests can be claimed before its follower: killed in between, its batch
    has rows and an unclaimed follower. With no executor alive it is interrupted (nobody
    runs it); once a worker holds its lease, running; the worker then finishes it."""
    import sqlalchemy as sa

    from accessctl.lease import any_executor_alive
    from accessctl.models import Access, AccessStatus, utcnow

    users = cli.add_users(1)
    filed = cli.json("batch", "3", *user_args(users), "--detach", "--json")
    batch_id = filed["batch_id"]
    assert state_of(cli, batch_id)["state"] == "queued"
    # What the dead run left: one request claimed under its executor ID and recorded,
    # the follower and the other requests still queued.
    dead = "deadhost-1-0000"
    engine = cli.engine()
    try:
        with engine.begin() as conn:
            request = conn.execute(
                sa.text(
                    f"SELECT workflow_uuid FROM {cli.workflow_table} WHERE queue_name = "
                    "'access-requests' ORDER BY workflow_uuid LIMIT 1"
                )
            ).scalar_one()
            conn.execute(
                sa.text(
                    f"UPDATE {cli.workflow_table} SET status = 'PENDING', executor_id = :e "
                    "WHERE workflow_uuid = :w"
                ),
                {"e": dead, "w": request},
            )
            conn.execute(
                sa.insert(Access).values(
                    id=uuid.uuid4(),
                    user_id=uuid.UUID(users[0]),
                    status=AccessStatus.REQUESTED,
                    request_id=request,
                    batch_id=uuid.UUID(batch_id),
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
        assert dbos_count(cli, "workflow_uuid = :w AND status = 'ENQUEUED'", w=f"batch-{batch_id}")
        assert not any_executor_alive(engine)
        assert state_of(cli, batch_id)["state"] == "interrupted"
        worker = cli.popen("worker")
        try:
            wait_for(lambda: any_executor_alive(engine), timeout=60, what="the worker's lease")
            # One command per look: the state moves on while the worker runs.
            assert cli.json("status", batch_id, "--json")["state"] in ("running", "done")
            wait_for(
                lambda: cli.json("status", batch_id, "--json")["state"] == "done",
                timeout=60,
                what="the worker to finish the batch",
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.communicate(timeout=60)
        assert not any_executor_alive(engine)
    finally:
        engine.dispose()
    report = state_of(cli, batch_id)
    assert (report["recorded"], report["failed"]) == (3, 0)
    assert cli.scalar("SELECT count(*) FROM accesses") == 3


def test_cancel_refuses_an_unknown_batch(cli: Cli) -> None:
    result = cli("cancel", str(uuid.uuid4()))
    assert result.exit_code == 2 and "no batch" in result.stderr


# --- keys are bound to their input ----------------------------------------------------------


def test_a_key_with_other_input_is_refused_naming_its_batch(cli: Cli) -> None:
    users = cli.add_users(2)
    first = cli.json("batch", "4", *user_args(users), "--key", "demo-1", "--json")
    for args in (
        ["batch", "3", *user_args(users)],  # another count
        ["batch", "4", "--user", users[0]],  # other IDs
        ["submit", *users],  # another command's input
    ):
        result = cli(*args, "--key", "demo-1", "--json")
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and first["batch_id"] in result.stderr
        # --json: the error as one JSON document on stdout too.
        assert json.loads(result.stdout)["exit_code"] == 2
        assert first["batch_id"] in json.loads(result.stdout)["error"]
    # The same input attaches, as a retry of a crashed run must.
    again = cli.json("batch", "4", *user_args(users), "--key", "demo-1", "--json")
    assert again["batch_id"] == first["batch_id"] and again["total"] == 4
    assert cli.scalar("SELECT count(*) FROM batches") == 1
    detached = cli("batch", "3", *user_args(users), "--key", "demo-1", "--detach")
    assert detached.exit_code == 2


def test_the_follower_checkpoints_no_step_while_it_waits(cli: Cli) -> None:
    """A request workflow cancelled from outside (the dbos CLI) leaves its request without
    a row: the follower records it as RequestEnded after its stall check, reading DBOS
    through a client, so it writes no step checkpoint however long it polls."""
    users = cli.add_users(1)
    batch_id = cli("batch", "3", *user_args(users), "--detach").stdout.strip()
    cancel_from_outside(cli, f"req-{batch_id}-0000001")
    worker = cli.run("worker", "--burst", timeout=90)
    assert worker.returncode == 0, worker.stderr
    report = state_of(cli, batch_id)
    assert (report["recorded"], report["failed"], report["state"]) == (2, 1, "done")
    assert [e["message"]["error_class"] for e in cli.json("errors", "--json")] == ["RequestEnded"]
    outputs = cli.workflow_table.replace("workflow_status", "operation_outputs")
    assert (
        cli.scalar(
            f"SELECT count(*) FROM {outputs} WHERE workflow_uuid = :w", w=f"batch-{batch_id}"
        )
        == 0
    )

"""The operator's toolkit: batches, retry, prune, output formats, version."""

from __future__ import annotations

import json
import uuid

from accessctl import __version__
from conftest import SEED, Cli


def file_failing_batch(cli: Cli) -> dict[str, object]:
    result = cli("submit", *SEED, "--json")
    assert result.exit_code == 1, result.stderr
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def test_every_listing_speaks_every_format(cli: Cli) -> None:
    cli.add_users(2)
    file_failing_batch(cli)
    for command, id_field in (
        (["errors"], "id"),
        (["users", "list"], "id"),
        (["accesses", "list"], "id"),
        (["batches"], "batch_id"),
    ):
        as_json = json.loads(cli(*command, "-o", "json").stdout)
        assert json.loads(cli(*command, "--json").stdout) == as_json
        lines = cli(*command, "-o", "jsonl").stdout.splitlines()
        assert [json.loads(line) for line in lines] == as_json
        ids = cli(*command, "-o", "ids").stdout.splitlines()
        assert ids == [str(row[id_field]) for row in as_json]
        table = cli(*command, "-o", "table")
        assert table.exit_code == 0 and "───" in table.stdout
        wide = cli(*command, "-o", "wide")
        assert wide.exit_code == 0, wide.stderr
        # Every ID whole, on one line, in both tables.
        for row in as_json:
            assert str(row[id_field]) in wide.stdout
            if command != ["errors"]:  # an error's own ID is a wide column
                assert str(row[id_field]) in table.stdout
        assert cli(*command, "-o", "yaml").exit_code == 2
        assert cli(*command, "--json", "-o", "ids").exit_code == 2


def test_ids_compose_in_a_pipeline(cli: Cli) -> None:
    summary = file_failing_batch(cli)
    ids = cli("errors", "-o", "ids").stdout.split()
    assert len(ids) == 4 and all(uuid.UUID(i) for i in ids)
    batch_ids = cli("batches", "-o", "ids").stdout.split()
    assert batch_ids == [summary["batch_id"]]


def test_batches_lists_counts_state_and_links(cli: Cli) -> None:
    users = cli.add_users(1)
    first = file_failing_batch(cli)
    second = cli.json("submit", users[0], "--json")
    listed = cli.json("batches", "--json")
    assert [b["batch_id"] for b in listed] == [second["batch_id"], first["batch_id"]]
    newest, oldest = listed
    assert (newest["total"], newest["recorded"], newest["failed"]) == (1, 1, 0)
    assert (oldest["total"], oldest["recorded"], oldest["failed"]) == (4, 0, 4)
    assert {b["state"] for b in listed} == {"done"}
    assert len(cli.json("batches", "--json", "--limit", "1")) == 1
    detached = cli("submit", users[0], "--detach").stdout.strip()
    states = {b["batch_id"]: b["state"] for b in cli.json("batches", "--json")}
    assert states[detached] == "queued"  # filed, nobody running it yet


def test_retry_files_exactly_the_failed_requests_once(cli: Cli) -> None:
    original = file_failing_batch(cli)
    dry = cli.json("retry", str(original["batch_id"]), "--dry-run", "--json")
    assert sorted(r["user_id"] for r in dry) == SEED
    assert cli.scalar("SELECT count(*) FROM batches") == 1  # a dry run files nothing
    # Make two of the four users exist, then retry: those two now succeed.
    for user_id in SEED[:2]:
        added = cli(
            "users", "add", "--name", "U", "--email", f"{user_id[-4:]}@example.com", "--id", user_id
        )
        assert added.exit_code == 0, added.stderr
    result = cli("retry", str(original["batch_id"]), "--json")
    assert result.exit_code == 1, result.stderr
    retried = json.loads(result.stdout)
    assert (retried["total"], retried["recorded"], retried["failed"]) == (4, 2, 2)
    again = json.loads(cli("retry", str(original["batch_id"]), "--json").stdout)
    assert again["batch_id"] == retried["batch_id"]  # running it twice files one batch
    assert cli.scalar("SELECT count(*) FROM batches") == 2
    assert cli.scalar("SELECT count(*) FROM accesses") == 2
    listed = {b["batch_id"]: b for b in cli.json("batches", "--json")}
    assert listed[retried["batch_id"]]["retry_of"] == original["batch_id"]


def test_a_cancelled_request_is_recorded_as_failed_and_can_be_retried(cli: Cli) -> None:
    from dbos import DBOSClient

    users = cli.add_users(3)
    batch_id = cli("submit", *users, "--detach").stdout.strip()
    engine = cli.engine()
    client = DBOSClient(
        system_database_engine=engine,
        dbos_system_schema=None if cli.database_url.startswith("sqlite") else "dbos",
    )
    try:
        client.cancel_workflow(f"req-{batch_id}-0000001")  # an operator cancels one request
    finally:
        client.destroy()
        engine.dispose()
    worker = cli.run("worker", "--burst", timeout=120)
    assert worker.returncode == 0, worker.stderr
    status = cli.json("status", batch_id, "--json")
    assert (status["state"], status["recorded"], status["failed"]) == ("done", 2, 1)
    [error] = cli.json("errors", "--batch", batch_id, "--json")
    assert error["message"]["error_class"] == "RequestEnded"
    assert error["message"]["user_id"] == users[1]
    retried = cli("retry", batch_id, "--json")
    assert retried.exit_code == 0, retried.stderr
    assert json.loads(retried.stdout)["recorded"] == 1
    assert cli.scalar("SELECT count(*) FROM accesses") == 3


def test_retry_of_a_clean_or_unknown_batch_is_a_usage_error(cli: Cli) -> None:
    users = cli.add_users(1)
    clean = cli.json("submit", users[0], "--json")
    assert cli("retry", clean["batch_id"]).exit_code == 2
    assert cli("retry", str(uuid.uuid4())).exit_code == 2
    assert cli("retry", "not-a-batch").exit_code == 2


def test_prune_removes_finished_work_and_keeps_running_work(cli: Cli) -> None:
    users = cli.add_users(1)
    file_failing_batch(cli)
    cli.json("submit", users[0], "--json")
    queued = cli("submit", users[0], "--detach").stdout.strip()
    before = cli.scalar(f"SELECT count(*) FROM {cli.workflow_table}")
    dry = cli.json("prune", "--older-than", "0s", "--dry-run", "--json")
    assert dry["dry_run"] is True and dry["batches"] == 2 and dry["errors"] == 4
    assert dry["workflows"] == 2 + 4 + 1  # two batches: their workflows and requests
    assert cli.scalar(f"SELECT count(*) FROM {cli.workflow_table}") == before
    done = cli.json("prune", "--older-than", "0s", "--json")
    assert (done["workflows"], done["errors"]) == (7, 4)
    assert cli.scalar("SELECT count(*) FROM errors") == 0
    assert cli.scalar("SELECT count(*) FROM accesses") == 1  # accesses are never pruned
    remaining = cli.rows(f"SELECT workflow_uuid, status FROM {cli.workflow_table}")
    # The queued batch was filed with its request: both stay, untouched.
    kept = {f"batch-{queued}": "ENQUEUED", f"req-{queued}-0000000": "ENQUEUED"}
    assert {r[0]: r[1] for r in remaining} == kept
    prefix = "" if cli.database_url.startswith("sqlite") else "dbos."
    # Every DBOS 3.4 table keyed by workflow ID: nothing of a pruned workflow may survive.
    keyed_by_workflow = (
        ("operation_outputs", "workflow_uuid"),
        ("workflow_events", "workflow_uuid"),
        ("workflow_events_history", "workflow_uuid"),
        ("streams", "workflow_uuid"),
        ("notifications", "destination_uuid"),
        ("workflow_input", "workflow_uuid"),
        ("workflow_output", "workflow_uuid"),
    )
    for table, column in keyed_by_workflow:
        orphans = cli.scalar(
            f"SELECT count(*) FROM {prefix}{table} WHERE {column} NOT IN (:a, :b)",
            a=f"batch-{queued}",
            b=f"req-{queued}-0000000",
        )
        assert orphans == 0, table
    nothing = cli.json("prune", "--older-than", "30d", "--json")
    assert (nothing["workflows"], nothing["errors"]) == (0, 0)
    # The queued batch still runs to completion after the prune.
    worker = cli.run("worker", "--burst", timeout=60)
    assert worker.returncode == 0, worker.stderr
    assert cli.json("status", queued, "--json")["state"] == "done"


def test_version_and_examples_in_help(cli: Cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"accessctl {__version__}"
    for command in (
        ["submit"],
        ["batch"],
        ["errors"],
        ["status"],
        ["batches"],
        ["retry"],
        ["prune"],
        ["migrate"],
        ["worker"],
        ["config"],
        ["users", "add"],
        ["users", "list"],
        ["users", "import"],
        ["accesses", "list"],
        ["accesses", "approve"],
    ):
        help_text = cli(*command, "--help").stdout
        assert "Example: accessctl" in help_text, command

"""Workers and cron runs are observable: a worker logs the batches it works on and a
summary, a requested stop is not an error, and runs write Prometheus metrics that an
alert on the last success can use."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from accessctl.metrics import previous_success, write_metrics
from conftest import Cli


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def json_lines(stderr: str) -> list[dict[str, object]]:
    # Nothing plain-text in a JSON log stream: every line parses.
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_a_worker_logs_each_batch_and_its_totals_and_writes_metrics(
    cli: Cli, tmp_path: Path
) -> None:
    users = cli.add_users(2)
    clean = cli("submit", *users, "--detach").stdout.strip()
    failing = cli("submit", users[0], "00000000-0000-0000-0000-000000000009", "--detach")
    failing_id = failing.stdout.strip()
    metrics = tmp_path / "textfile" / "accessctl-worker.prom"
    worker = cli.run("worker", "--burst", "--metrics-file", str(metrics), timeout=120)
    assert worker.returncode == 0, worker.stderr
    lines = json_lines(worker.stderr)
    events = [(line["event"], line.get("batch_id")) for line in lines]
    for batch_id in (clean, failing_id):
        assert ("batch started", batch_id) in events
        assert ("batch finished", batch_id) in events
    finished = {line["batch_id"]: line for line in lines if line["event"] == "batch finished"}
    assert (finished[failing_id]["recorded"], finished[failing_id]["failed"]) == (1, 1)
    [summary] = [line for line in lines if line["event"] == "worker summary"]
    assert summary["batches_finished"] == 2 and summary["stopped_by"] == "empty queue"
    assert (summary["recorded"], summary["failed"]) == (3, 1)
    found = samples(metrics)
    assert found[("accessctl_requests", (("job", "worker"), ("outcome", "recorded")))] == 3
    failed_key = ("accessctl_requests_failed", (("error_class", "UnknownUser"), ("job", "worker")))
    assert found[failed_key] == 1
    assert found[("accessctl_queue_depth", (("job", "worker"),))] == 0
    # A clean batch ended: that is the worker's last success.
    success = found[("accessctl_last_success_timestamp_seconds", (("job", "worker"),))]
    assert time.time() - 120 < success <= time.time()
    assert not list(metrics.parent.glob("*.tmp*"))  # written by rename, nothing left over


def test_a_stopped_worker_logs_the_stop_as_info_and_exits_143(cli: Cli) -> None:
    worker = cli.popen("worker")
    try:
        deadline = time.monotonic() + 60
        assert worker.stderr is not None
        while time.monotonic() < deadline:  # wait until it runs
            line = worker.stderr.readline()
            if "worker started" in line:
                break
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 143, stderr
    assert "error" not in stderr.lower(), stderr
    lines = json_lines(stderr)
    assert any(line["event"] == "worker summary" and line["level"] == "info" for line in lines)
    assert lines[-1]["level"] == "info" and lines[-1]["exit_code"] == 143


def test_a_cron_run_writes_metrics_and_keeps_its_last_success(cli: Cli, tmp_path: Path) -> None:
    users = cli.add_users(1)
    path = tmp_path / "accessctl-nightly.prom"
    ok = cli("submit", users[0], "--metrics-file", str(path))
    assert ok.exit_code == 0, ok.stderr
    first = samples(path)
    job = (("job", "submit"),)
    success = first[("accessctl_last_success_timestamp_seconds", job)]
    assert first[("accessctl_last_run_exit_code", job)] == 0
    assert first[("accessctl_batch_duration_seconds", job)] > 0
    # A failing run, configured by the environment this time: its success stays the last one.
    bad = cli("submit", "00000000-0000-0000-0000-000000000009", ACCESSCTL_METRICS_FILE=str(path))
    assert bad.exit_code == 1
    second = samples(path)
    assert second[("accessctl_last_run_exit_code", job)] == 1
    assert second[("accessctl_last_success_timestamp_seconds", job)] == success
    assert second[("accessctl_last_run_timestamp_seconds", job)] >= success
    failed = ("accessctl_requests_failed", (("error_class", "UnknownUser"), ("job", "submit")))
    assert second[failed] == 1


def test_the_last_success_is_carried_over_and_zero_when_never_seen(tmp_path: Path) -> None:
    path = tmp_path / "job.prom"
    assert previous_success(path, "submit") == 0.0
    common = {"exit_code": 1, "recorded": 0, "failed_by_class": {}, "duration": 1.0, "queue": 0}
    write_metrics(path, job="submit", success_at=None, now=100.0, **common)  # type: ignore[arg-type]
    assert previous_success(path, "submit") == 0.0
    write_metrics(path, job="submit", success_at=150.0, now=150.0, **common)  # type: ignore[arg-type]
    write_metrics(path, job="submit", success_at=None, now=200.0, **common)  # type: ignore[arg-type]
    assert previous_success(path, "submit") == 150.0
    path.write_text("garbage {{{")
    assert previous_success(path, "submit") == 0.0

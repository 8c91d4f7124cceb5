"""``accessctl serve``: the HTTP API on the same workflows, queue and shared limit.

The real server runs in a subprocess (``accessctl serve --port N``) and is driven with
httpx; the fast validation and fuzz tests drive the same app in-process with FastAPI's
TestClient, as a pure API front (no DBOS launch), on a migrated database per backend.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SEED, Cli, start_accessctl
from test_faults import (
    max_starts_in_window,
    request_count,
    request_starts,
    terminal_outcomes,
    wait_for,
)

TOKEN = "test-token-" + "a1b2c3d4" * 4
# FastAPI's TestClient still rides on httpx, which Starlette now warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
DOCS_OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    out_path: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout=90)


def start_server(cli: Cli, tmp_path: Path, *args: str, **env: str) -> Server:
    """``accessctl serve`` on a free port; stderr (the logs) and stdout go to files, so a
    long run never blocks on a full pipe."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    out_path = tmp_path / f"serve-{port}.out"
    with open(log_path, "wb") as err, open(out_path, "wb") as out:
        proc = start_accessctl(
            ["serve", "--port", str(port), *args],
            env={**os.environ, **cli.base_env(), **env},
            stdout=out,
            stderr=err,
        )
    return Server(proc, f"http://127.0.0.1:{port}", log_path, out_path)


def wait_healthy(server: Server, timeout: float = 60) -> None:
    def healthy() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited {server.proc.returncode}: {server.log()}")
        try:
            return httpx.get(server.url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout=timeout, what="/healthz")


@contextmanager
def served(cli: Cli, tmp_path: Path, *args: str, **env: str) -> Iterator[Server]:
    server = start_server(cli, tmp_path, *args, **env)
    try:
        wait_healthy(server)
        yield server
    finally:
        code = server.stop()
    # SIGTERM: graceful, then 143 through the CLI's one line; stdout carries no data.
    assert code == 143, server.log()
    assert "accessctl: error: server stopped" in server.log()
    assert server.out_path.read_text() == ""
    assert "Traceback" not in server.log()


def wait_batch_state(client: httpx.Client, batch_id: str, states: tuple[str, ...]) -> Any:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        answer = client.get(f"/batches/{batch_id}")
        assert answer.status_code == 200, answer.text
        seen.update(answer.json())
        return seen["state"] in states

    wait_for(reached, timeout=90, what=f"batch {batch_id} {states}")
    return seen


def assert_error(answer: httpx.Response, status: int, contains: str = "") -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"error", "status"} and body["status"] == status
    assert "\n" not in body["error"] and contains in body["error"]


# --- the real server, on both backends ----------------------------------------------------------


def test_every_endpoint(cli: Cli, tmp_path: Path) -> None:
    users = cli.add_users(2)
    with served(cli, tmp_path) as server, server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/openapi.json").json()["info"]["title"] == "accessctl"

        # POST /submit: the configured (seed) IDs, none of whom exists: four failures.
        filed = client.post("/submit")
        assert filed.status_code == 202, filed.text
        seed_batch = filed.json()["batch_id"]
        assert filed.headers["location"] == f"/batches/{seed_batch}"
        assert filed.json() == {"batch_id": seed_batch, "key": None, "total": 4, "filed": True}

        # Given IDs, under a key: the same key and body attach, another body is refused.
        keyed = client.post("/submit", json={"user_ids": users}, headers={"Idempotency-Key": "k1"})
        assert keyed.status_code == 202, keyed.text
        again = client.post("/submit", json={"user_ids": users}, headers={"Idempotency-Key": "k1"})
        assert again.status_code == 200 and again.json()["batch_id"] == keyed.json()["batch_id"]
        assert again.json()["filed"] is False
        other = client.post(
            "/submit", json={"user_ids": users[:1]}, headers={"Idempotency-Key": "k1"}
        )
        assert_error(other, 409, "already names batch")

        # The CLI's validation and messages.
        assert_error(client.post("/submit", json={"user_ids": ["nope"]}), 422, "malformed user ID")
        assert_error(client.post("/batch/0"), 422, "N must be from 1 to")
        assert_error(client.post("/batch/abc"), 422, "N must be a whole number")

        # POST /batch/{count}, cycling over the given users.
        batch = client.post("/batch/6", json={"users": users})
        assert batch.status_code == 202, batch.text
        batch_id = batch.json()["batch_id"]
        done = wait_batch_state(client, batch_id, ("done",))
        assert (done["total"], done["recorded"], done["failed"], done["done"]) == (6, 6, 0, 6)
        seed = wait_batch_state(client, seed_batch, ("done",))
        assert (seed["recorded"], seed["failed"]) == (0, 4)
        assert terminal_outcomes(cli, batch_id) == (6, 0, 6)

        # GET /batches: newest first, with state.
        listed = client.get("/batches", params={"limit": 10}).json()
        assert listed[0]["batch_id"] == batch_id
        assert {b["batch_id"] for b in listed} >= {batch_id, seed_batch}
        assert_error(client.get(f"/batches/{uuid.uuid4()}"), 404, "no batch with ID")
        assert_error(client.get("/batches/not-a-uuid"), 422, "is not a UUID")

        # GET /errors, a page at a time, with the CLI's filters.
        first = client.get("/errors", params={"limit": 3, "batch": seed_batch}).json()
        assert len(first["errors"]) == 3 and first["next_cursor"]
        rest = client.get(
            "/errors", params={"limit": 3, "batch": seed_batch, "cursor": first["next_cursor"]}
        ).json()
        assert len(rest["errors"]) == 1 and rest["next_cursor"] is None
        ids = [e["id"] for e in first["errors"] + rest["errors"]]
        assert len(set(ids)) == 4
        assert {e["message"]["user_id"] for e in first["errors"] + rest["errors"]} == set(SEED)
        assert client.get("/errors", params={"since": "1h"}).json()["errors"]
        assert_error(client.get("/errors", params={"since": "soon"}), 422, "--since")
        assert_error(client.get("/errors", params={"cursor": "garbage"}), 422, "cursor")
        assert_error(client.get("/errors", params={"limit": 0}), 422, "limit must be from 1")

        # POST /batches/{id}/retry: once, however often it is asked.
        retried = client.post(f"/batches/{seed_batch}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["key"] == f"retry-of-{seed_batch}"
        twice = client.post(f"/batches/{seed_batch}/retry")
        assert (twice.status_code, twice.json()["batch_id"]) == (200, retried.json()["batch_id"])
        assert_error(client.post(f"/batches/{batch_id}/retry"), 422, "no failed requests")
        assert_error(client.post(f"/batches/{uuid.uuid4()}/retry"), 404, "no batch")
        assert_error(client.get("/nowhere"), 404)
        assert_error(client.delete("/submit"), 405)
    log_lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [r for r in log_lines if r.get("logger") == "accessctl.access"]
    assert {"method", "path", "status", "duration_ms"} <= set(access[0])
    assert any(r["path"] == "/submit" and r["status"] == 202 for r in access)


def test_fifty_concurrent_posts_with_one_key_file_one_batch(cli: Cli, tmp_path: Path) -> None:
    with served(cli, tmp_path, "--no-execute") as server:

        def post(_: int) -> httpx.Response:
            with server.client() as client:
                return client.post("/batch/5", headers={"Idempotency-Key": "fifty"})

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(post, range(50)))
    assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
    assert sorted(a.status_code for a in answers).count(202) == 1
    assert len({a.json()["batch_id"] for a in answers}) == 1
    assert cli.scalar("SELECT count(*) FROM batches") == 1
    # The batch's follower and its five requests, queued once; none executed (--no-execute).
    assert cli.scalar(f"SELECT count(*) FROM {cli.workflow_table}") == 6
    assert cli.scalar(f"SELECT count(*) FROM {cli.workflow_table} WHERE status = 'ENQUEUED'") == 6


def test_a_key_names_the_same_batch_over_http_and_from_the_cli(cli: Cli, tmp_path: Path) -> None:
    users = cli.add_users(2)
    with served(cli, tmp_path, "--no-execute") as server, server.client() as client:
        filed = client.post("/submit", json={"user_ids": users}, headers={"Idempotency-Key": "k"})
        assert filed.status_code == 202, filed.text
        same = cli("submit", *users, "--key", "k", "--detach")
        assert same.exit_code == 0, same.stderr
        assert same.stdout.strip() == filed.json()["batch_id"]
        other = cli("submit", users[0], "--key", "k", "--detach")
        assert other.exit_code == 2 and "already names batch" in other.stderr
        # And the other way round: a batch the CLI filed, attached to over HTTP.
        cli_filed = cli("batch", "3", "--user", users[0], "--key", "c", "--detach")
        assert cli_filed.exit_code == 0, cli_filed.stderr
        again = client.post(
            "/batch/3", json={"users": [users[0]]}, headers={"Idempotency-Key": "c"}
        )
        assert (again.status_code, again.json()["batch_id"]) == (200, cli_filed.stdout.strip())
    assert cli.scalar("SELECT count(*) FROM batches") == 2


def test_server_and_worker_share_one_limit(cli: Cli, tmp_path: Path) -> None:
    users = cli.add_users(2)
    result = cli("limit", "set", "10/2")
    assert result.exit_code == 0, result.output + result.stderr
    cli.env["ACCESSCTL_RATE_LIMIT"] = "10/2"
    worker = cli.popen("worker")
    try:
        with served(cli, tmp_path) as server, server.client() as client:
            filed = client.post("/batch/40", json={"users": users})
            assert filed.status_code == 202, filed.text
            done = wait_batch_state(client, filed.json()["batch_id"], ("done",))
            assert done["recorded"] == 40
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=90)
    assert worker.returncode == 143, err
    starts = request_starts(cli)
    assert len(starts) == 40
    assert max_starts_in_window(starts, 2.0) <= 10


def test_server_killed_mid_batch_then_restarted_loses_and_doubles_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    users = cli.add_users(3)
    n = 30
    server = start_server(cli, tmp_path)
    try:
        wait_healthy(server)
        with server.client() as client:
            filed = client.post(
                f"/batch/{n}", json={"users": users}, headers={"Idempotency-Key": "kill"}
            )
        assert filed.status_code == 202, filed.text
        batch_id = filed.json()["batch_id"]
        wait_for(lambda: request_count(cli) >= n // 3, what="a third of the batch")
    finally:
        server.proc.kill()
        server.proc.wait(timeout=10)
    assert server.proc.returncode == -signal.SIGKILL
    with served(cli, tmp_path) as again, again.client() as client:
        # The same POST attaches to the batch the dead server filed.
        repeat = client.post(
            f"/batch/{n}", json={"users": users}, headers={"Idempotency-Key": "kill"}
        )
        assert (repeat.status_code, repeat.json()["batch_id"]) == (200, batch_id)
        done = wait_batch_state(client, batch_id, ("done",))
    assert (done["recorded"], done["failed"]) == (n, 0)
    assert terminal_outcomes(cli, batch_id) == (n, 0, n)
    assert cli.scalar("SELECT count(*) FROM batches") == 1


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_batch_stops_gracefully_and_a_worker_finishes_the_rest(
    cli: Cli, tmp_path: Path, signum: int, code: int
) -> None:
    users = cli.add_users(2)
    n = 25
    server = start_server(cli, tmp_path, ACCESSCTL_SHUTDOWN_GRACE="2")
    try:
        wait_healthy(server)
        with server.client() as client:
            filed = client.post(f"/batch/{n}", json={"users": users})
        assert filed.status_code == 202, filed.text
        wait_for(lambda: request_count(cli) >= 5, what="some requests")
    finally:
        stopped = server.stop(signum)
    assert stopped == code, server.log()
    assert (
        server.log()
        .rstrip()
        .endswith("accessctl: error: server stopped; queued work stays for other workers")
    )
    assert request_count(cli) < n  # it stopped taking work: the rest stayed queued
    drained = cli.run("worker", "--burst")
    assert drained.returncode == 0, drained.stderr
    assert terminal_outcomes(cli, filed.json()["batch_id"]) == (n, 0, n)


@pytest.mark.parametrize("mode", ["--execute", "--no-execute"])
def test_a_limit_given_on_purpose_that_differs_refuses_to_start(
    cli: Cli, tmp_path: Path, mode: str
) -> None:
    server = start_server(cli, tmp_path, mode, ACCESSCTL_RATE_LIMIT="7/1")
    assert server.proc.wait(timeout=60) == 2, server.log()
    errors = [line for line in server.log().splitlines() if line.startswith("accessctl: error:")]
    assert len(errors) == 1 and "differs from the shared limit 5/0.5" in errors[0]
    assert "Traceback" not in server.log()


# --- auth (SQLite is enough: it is the same code on both) ------------------------------------


def test_off_loopback_needs_a_token(cli: Cli, tmp_path: Path, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("auth does not depend on the backend")
    refused = start_server(cli, tmp_path, "--host", "0.0.0.0")
    assert refused.proc.wait(timeout=60) == 2
    lines = refused.log().strip().splitlines()
    assert lines[-1].startswith("accessctl: error: --host 0.0.0.0 is not a loopback address")

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with (
        served(
            cli,
            tmp_path,
            "--host",
            "0.0.0.0",
            "--no-execute",
            ACCESSCTL_SERVE_TOKEN_FILE=str(token_file),
        ) as server,
        server.client() as client,
    ):
        assert_error(client.get("/batches"), 401, "bearer token")
        assert client.get("/batches").headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
        assert_error(client.get("/batches", headers=wrong), 401)
        assert_error(client.get("/batches", headers={"Authorization": TOKEN}), 401)
        assert_error(client.post("/submit", headers=wrong), 401)
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/batches", headers=right).status_code == 200
        assert client.post("/submit", headers=right).status_code == 202
        assert client.get("/healthz").status_code == 200  # probes stay open
        assert client.get("/readyz").status_code == 200
        assert_error(client.get("/openapi.json"), 401)
    assert TOKEN not in server.log()
    assert TOKEN[:-1] not in server.log()
    assert "authorization" not in server.log().lower()


# --- in-process: validation and fuzzing -------------------------------------------------------


@pytest.fixture
def api(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from accessctl.logs import configure_logging
    from accessctl.server import ServerState, create_app
    from accessctl.settings import resolve_settings

    # The CLI fixture's runs left the log handler on their own, now closed, stderr.
    configure_logging("json", stream=sys.stderr)

    for name, value in {**cli.base_env(), "ACCESSCTL_MAX_BATCH": "50"}.items():
        monkeypatch.setenv(name, value)
    state = ServerState(resolve_settings({}), execute=False)
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        yield client


def test_bounds_and_malformed_bodies(api: Any) -> None:
    assert_error(
        api.post("/submit", content=b"{", headers={"content-type": "application/json"}),
        400,
        "malformed JSON",
    )
    assert_error(api.post("/submit", json={"user_ids": "x"}), 422, "user_ids")
    assert_error(api.post("/submit", json={"user_ids": [1]}), 422, "valid string")
    assert_error(api.post("/submit", json={"extra": 1}), 422, "extra")
    assert_error(api.post("/submit", json=[SEED[0]]), 422, "JSON object")
    assert_error(api.post("/batch/51"), 422, "from 1 to 50")
    assert_error(api.post("/batch/-1"), 422, "from 1 to 50")
    big = json.dumps({"user_ids": [SEED[0]] * 40_000}).encode()
    assert len(big) > 1 << 20
    assert_error(
        api.post("/submit", content=big, headers={"content-type": "application/json"}), 413
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"user_ids": ['
        for _ in range(30_000):
            yield b'"00000000-0000-0000-0000-000000000000",'
        yield b"]}"

    assert_error(
        api.post("/submit", content=chunks(), headers={"content-type": "application/json"}), 413
    )
    assert_error(api.post("/submit", headers={"Idempotency-Key": " "}), 422, "--key")
    assert_error(api.post("/submit", json={"user_ids": ["-"]}), 422, "not a UUID")
    skipped = api.post("/submit", json={"user_ids": [SEED[0], "bad"], "skip_invalid": True})
    assert skipped.status_code == 202 and skipped.json()["total"] == 2


def test_readyz_says_when_the_schema_is_behind(api: Any, cli: Cli) -> None:
    assert api.get("/readyz").json() == {"status": "ready"}
    head = cli.scalar("SELECT version_num FROM alembic_version")
    engine = cli.engine()
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
        assert_error(api.get("/readyz"), 503, "run `accessctl migrate`")
        assert api.get("/healthz").status_code == 200  # up, not ready
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{head}'")
        engine.dispose()


def test_an_unexpected_failure_is_a_bare_500(api: Any) -> None:
    @api.app.get("/boom")  # type: ignore[untyped-decorator]
    def boom() -> None:
        raise RuntimeError("secret-detail")

    answer = api.get("/boom")
    assert_error(answer, 500)
    assert answer.json()["error"] == "internal error"
    assert "secret-detail" not in answer.text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
BODIES = (
    JSON.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries({"user_ids": JSON}).map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries({"users": JSON}).map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
)
COUNTS = st.text(max_size=12) | st.integers(-(2**70), 2**70).map(str)
QUERY = st.dictionaries(
    st.sampled_from(["since", "batch", "limit", "cursor"]), st.text(max_size=30), max_size=4
)


@settings(
    derandomize=True,
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES, count=COUNTS, query=QUERY, key=st.none() | st.text(max_size=20))
def test_fuzzed_requests_get_only_json_4xx_errors(
    api: Any, body: bytes, count: str, query: dict[str, str], key: str | None
) -> None:
    headers = {"content-type": "application/json"}
    if key is not None and key.isascii() and key.isprintable():
        headers["Idempotency-Key"] = key
    answers = [
        api.post("/submit", content=body, headers=headers),
        api.post(f"/batch/{quote(count, safe='')}", content=body, headers=headers),
        api.get("/errors", params=query),
        api.get("/batches", params={k: v for k, v in query.items() if k == "limit"}),
    ]
    for answer in answers:
        assert answer.status_code < 500, answer.text
        if answer.status_code >= 400:
            assert_error(answer, answer.status_code)


# --- no server needed -------------------------------------------------------------------------


def test_openapi_schema_is_checked_in() -> None:
    from accessctl.server import openapi_json

    assert DOCS_OPENAPI.read_text() == openapi_json(), (
        "docs/openapi.json is stale: uv run python -c 'from accessctl.server import "
        'openapi_json; print(openapi_json(), end="")\' > docs/openapi.json'
    )


def test_importing_the_cli_imports_no_web_stack() -> None:
    code = (
        "import sys, accessctl.entry, accessctl.cli; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"ACCESSCTL_SERVE_TOKEN": "short"}, "at least 16"),
        ({"ACCESSCTL_SERVE_TOKEN": "has space " + "x" * 20}, "letters, digits"),
        ({"ACCESSCTL_SERVE_TOKEN": TOKEN, "ACCESSCTL_SERVE_TOKEN_FILE": "/x"}, "not both"),
        ({"ACCESSCTL_SERVE_TOKEN_FILE": "/nonexistent/token"}, "cannot read"),
    ],
)
def test_bad_tokens_are_refused_without_echoing_them(env: dict[str, str], message: str) -> None:
    from accessctl.exceptions import ConfigError
    from accessctl.server import resolve_token

    with pytest.raises(ConfigError) as refused:
        resolve_token(env)
    assert message in refused.value.message
    assert env.get("ACCESSCTL_SERVE_TOKEN", "\0") not in refused.value.message


def test_token_file_is_read_bounded(tmp_path: Path) -> None:
    from accessctl.exceptions import ConfigError
    from accessctl.server import MAX_TOKEN_BYTES, resolve_token

    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert resolve_token({"ACCESSCTL_SERVE_TOKEN_FILE": str(path)}) == TOKEN
    assert resolve_token({"ACCESSCTL_SERVE_TOKEN": TOKEN}) == TOKEN
    assert resolve_token({}) is None
    path.write_bytes(b"a" * (MAX_TOKEN_BYTES + 1))
    with pytest.raises(ConfigError, match="longer than"):
        resolve_token({"ACCESSCTL_SERVE_TOKEN_FILE": str(path)})


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
    ],
)
def test_loopback_is_recognised(host: str, loopback: bool) -> None:
    from accessctl.server import is_loopback, listen_address

    assert is_loopback(listen_address(host, 0)[1]) is loopback

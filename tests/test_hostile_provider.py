"""A hostile provider: echoed tokens, bad gzip, odd Retry-After, slammed sockets, endless
bodies. Every answer is classified (never raised), every provider text is redacted and
bounded, and ``accessctl retry`` re-sends a request the provider may have filed under its
original idempotency key (issue #12)."""

from __future__ import annotations

import email.utils
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import h11
import httpx
import pytest

from accessctl import provider as provider_module
from accessctl.db import describe_db_error
from accessctl.provider import (
    MAX_BODY,
    MAX_DETAIL,
    ProviderConfig,
    call_provider,
    parse_retry_after,
)
from accessctl.queries import retry_key
from accessctl.redact import redact_text, redact_url, scrub_secrets, url_secrets
from accessctl.settings import Settings
from accessctl.testing.provider import FakeProvider
from conftest import Cli, punctual_starts

TOKEN = "tok-SENTINEL-3f9d2c"
QUERY_SECRET = "QSECRET-77a1"
# The rate limit these tests run under, in one place: the limit is becoming a stored,
# shared setting, and only this needs to change then.
LIMIT_ENV = {"ACCESSCTL_RATE_LIMIT": "50/1"}


def provider_env(provider: FakeProvider, **extra: str) -> dict[str, str]:
    return {
        "ACCESSCTL_PROVIDER_URL": f"{provider.url}?api_key={QUERY_SECRET}&region=eu",
        "ACCESSCTL_PROVIDER_TOKEN": TOKEN,
        **LIMIT_ENV,
        **extra,
    }


def user_args(users: list[str]) -> list[str]:
    return [a for u in users for a in ("--user", u)]


def config_for(provider: FakeProvider, *, timeout: float = 2.0) -> ProviderConfig:
    return ProviderConfig(
        url=f"{provider.url}?api_key={QUERY_SECRET}", token=TOKEN, timeout=timeout, deadline=30.0
    )


def assert_clean(answer: dict[str, Any]) -> None:
    text = json.dumps(answer)
    assert TOKEN not in text and QUERY_SECRET not in text, text
    assert len(answer["detail"]) <= MAX_DETAIL


# --- call_provider's classification, one hostile answer at a time -------------------------

CLASSIFIED = [
    # (hostile mode, outcome, HTTP status)
    ("echo-401", "refused", 401),
    ("echo-500", "transient", 500),
    ("gzip-200", "requested", 200),  # accepted, though its body cannot be decoded
    ("gzip-500", "transient", 500),
    ("status-302", "refused", 302),  # redirects are not followed
    ("status-418", "refused", 418),
    ("status-599", "transient", 599),
    ("status-600", "transient", 600),  # outside HTTP: malformed, may have acted
    ("status-101", "transient", None),  # a final 1xx: the client gives up on the connection
    ("cut-200", "requested", 200),  # the connection died mid-body: still accepted
    ("cut-500", "transient", 500),
    ("huge-200", "requested", 200),
    ("huge-500", "transient", 500),
    ("endless-200", "requested", 200),
    ("endless-500", "transient", 500),
    ("slam", "transient", None),
]


@pytest.mark.parametrize(("mode", "outcome", "status"), CLASSIFIED)
def test_every_hostile_answer_is_classified(mode: str, outcome: str, status: int | None) -> None:
    with FakeProvider(hostile=mode) as provider:
        started = time.monotonic()
        answer = call_provider(config_for(provider), request_id="req-x", user_id="u", batch_id="b")
        elapsed = time.monotonic() - started
        calls = list(provider.calls)
    assert (answer["outcome"], answer["http_status"]) == (outcome, status), answer
    assert [c.key for c in calls] == ["req-x"]
    assert elapsed < 2.0  # an endless body is abandoned at the byte cap, not the timeout
    assert_clean(answer)


@pytest.mark.parametrize("status", [401, 500])
def test_an_echoed_token_is_redacted_from_the_detail(status: int) -> None:
    with FakeProvider(hostile=f"echo-{status}") as provider:
        answer = call_provider(config_for(provider), request_id="r", user_id="u", batch_id="b")
    # The echo really was there (the request line and headers), redacted in place.
    assert answer["detail"].startswith("POST /access?api_key=*** HTTP/1.1"), answer
    assert "Idempotency-Key: r" in answer["detail"]
    assert_clean(answer)


def test_the_redirect_detail_names_the_target_without_its_secrets() -> None:
    with FakeProvider(hostile="status-307") as provider:
        answer = call_provider(config_for(provider), request_id="r", user_id="u", batch_id="b")
    assert answer["outcome"] == "refused"
    assert "/moved?api_key=*** not followed" in answer["detail"]
    assert "moved-secret" not in answer["detail"]


def test_a_trickling_body_is_abandoned_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is on bytes and on time: a body that never reaches the cap is not read past
    the call's timeout (each chunk arrives well within the per-read timeout)."""
    monkeypatch.setattr(provider_module, "MAX_BODY", 10**12)
    with FakeProvider(hostile="endless-500") as provider:
        started = time.monotonic()
        answer = call_provider(
            config_for(provider, timeout=0.5), request_id="r", user_id="u", batch_id="b"
        )
        elapsed = time.monotonic() - started
    assert answer["outcome"] == "transient" and answer["http_status"] == 500
    assert "still arriving at the timeout" in answer["detail"]
    assert elapsed < 3.0


RETRY_AFTER = [
    ("²", None),  # a unicode digit: str.isdigit() says yes, float() says no
    ("١٢", None),  # Arabic-Indic digits
    ("-1", None),
    ("1e309", None),
    ("NaN", None),
    ("1.5", None),
    ("", None),
    ("soon", None),
    (" 7 ", 7.0),
    ("99999999999", 30.0),  # capped at the deadline
    ("9" * 5000, 30.0),  # int() of this would raise
]


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER)
def test_retry_after_values(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, cap=30.0) == expected


def test_retry_after_as_an_http_date() -> None:
    now = time.time()
    ahead = email.utils.formatdate(now + 12, usegmt=True)
    far = email.utils.formatdate(now + 10**7, usegmt=True)
    past = email.utils.formatdate(now - 60, usegmt=True)
    assert 10.0 <= (parse_retry_after(ahead, now=now, cap=30.0) or 0) <= 12.0
    assert parse_retry_after(far, now=now, cap=30.0) == 30.0
    assert parse_retry_after(past, now=now, cap=30.0) == 0.0


@pytest.mark.parametrize(("value", "expected"), [("²", None), ("99999999999", 30.0), ("2", 2.0)])
def test_a_429s_retry_after_reaches_the_answer(value: str, expected: float | None) -> None:
    with FakeProvider(hostile="status-429", retry_after_raw=value) as provider:
        answer = call_provider(config_for(provider), request_id="r", user_id="u", batch_id="b")
    assert (answer["outcome"], answer["retry_after"]) == ("transient", expected)


class _Exploding:
    """An HTTP client whose ``send`` raises, as a broken client library might."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def build_request(self, *args: Any, **kwargs: Any) -> httpx.Request:
        return httpx.Request("POST", "http://127.0.0.1:9/access")

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError(f"boom {TOKEN}"),
        ValueError("bad value"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        h11.RemoteProtocolError("illegal status line", error_status_hint=400),
        httpx.ConnectError(f"refused: http://x/?api_key={QUERY_SECRET}"),
        httpx.ReadTimeout("slow"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_client_exception_is_transient(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    monkeypatch.setattr(provider_module, "_client", lambda timeout: _Exploding(exc))
    config = ProviderConfig(url=f"http://127.0.0.1:9/?api_key={QUERY_SECRET}", token=TOKEN)
    answer = call_provider(config, request_id="r", user_id="u", batch_id="b")
    assert (answer["outcome"], answer["http_status"]) == ("transient", None)
    assert type(exc).__name__ in answer["detail"]
    assert_clean(answer)


class _BrokenBody:
    """A 200 whose body raises while it is read: the answer still counts."""

    status_code = 200
    headers = httpx.Headers({"Content-Type": "application/json"})

    def iter_raw(self) -> Iterator[bytes]:
        yield b'{"status": "appr'
        raise RuntimeError("the body broke")

    def close(self) -> None:
        raise RuntimeError("and so did close")


def test_a_2xx_whose_body_breaks_is_still_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    class Client(_Exploding):
        def send(self, request: httpx.Request, **kwargs: Any) -> Any:
            return _BrokenBody()

    monkeypatch.setattr(provider_module, "_client", lambda timeout: Client(RuntimeError()))
    answer = call_provider(
        ProviderConfig(url="http://127.0.0.1:9/", token=TOKEN),
        request_id="r",
        user_id="u",
        batch_id="b",
    )
    assert (answer["outcome"], answer["http_status"]) == ("requested", 200)


def test_a_body_is_read_only_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    original = provider_module._read_bounded

    def spy(response: httpx.Response, deadline: float) -> tuple[bytes, str]:
        raw, problem = original(response, deadline)
        read.append(len(raw))
        return raw, problem

    monkeypatch.setattr(provider_module, "_read_bounded", spy)
    with FakeProvider(hostile="huge-500") as provider:
        answer = call_provider(config_for(provider), request_id="r", user_id="u", batch_id="b")
    assert read == [MAX_BODY]
    assert answer["outcome"] == "transient"


# --- redaction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ('{"Authorization": "Basic dXNlcjpwYXNz"}', "dXNlcjpwYXNz"),
        ("GET /x?api_key=k3y-value&b=1", "k3y-value"),
        ("api-key: k3y-value", "k3y-value"),
        ('{"client_secret": "s e c r e t"}', "s e c r e t"),
        ("{'password': 'hunter22'}", "hunter22"),
        ("dsn postgresql://bob:pw-in-url@db/x", "pw-in-url"),
        ("password=hunter22 host=db", "hunter22"),
        ("X-Auth-Token: t0ken-value\nOther: ok", "t0ken-value"),
        ('{"access_token": "unterminated t0ken-value', "t0ken-value"),
    ],
)
def test_secret_looking_fields_are_redacted(text: str, hidden: str) -> None:
    shown = redact_text(text)
    assert hidden not in shown and "***" in shown, shown


def test_known_secrets_long_and_short() -> None:
    # Long: wherever it is, even inside other text.
    assert scrub_secrets(f"x{TOKEN}y", [TOKEN]) == "x***y"
    # Short: only as a whole token; the message around it stays readable.
    assert scrub_secrets("connection to port 1 failed for p", ["p"]) == (
        "connection to port 1 failed for ***"
    )
    assert scrub_secrets("user bob:p@host", ["p"]) == "user bob:***@host"
    # Percent-encoded as in a URL.
    assert scrub_secrets("q=a%2Fb%3Dc", ["a/b=c"]) == "q=***"


def test_redacted_text_is_bounded_and_has_no_control_characters() -> None:
    shown = redact_text("\x1b[31mred\x00" + "x" * 10_000)
    assert len(shown) <= MAX_DETAIL
    assert "\x1b" not in shown and "\x00" not in shown


def test_redacting_a_hostile_body_is_fast() -> None:
    started = time.monotonic()
    redact_text('"token":"' * 20_000, [TOKEN])
    redact_text("tokentoken" * 20_000 + "=", limit=None)
    redact_text("a:" * 50_000 + "@", limit=None)
    assert time.monotonic() - started < 2.0


def test_provider_urls_are_shown_without_secrets() -> None:
    url = "https://svc:pa%40ss@[::1]:8443/v1?api_key=K1&region=eu&accessToken=T2&sig=S3#f"
    shown = redact_url(url)
    assert shown == "https://svc:***@[::1]:8443/v1?api_key=***&region=eu&accessToken=***&sig=***#f"
    assert redact_url("https://bare-token@host/x") == "https://***@host/x"
    assert redact_url("http://[::1/x") == "<malformed URL>"
    assert set(url_secrets(url)) >= {"pa@ss", "K1", "T2", "S3"}


def test_config_hides_the_provider_urls_secrets() -> None:
    settings = Settings(
        database_url="sqlite:////tmp/x.sqlite",
        database_url_source="test",
        provider_url=f"https://u:pw-secret@h/v1?api_key={QUERY_SECRET}&x=1",
        provider_token=TOKEN,
    )
    view = json.dumps(settings.public_view())
    assert QUERY_SECRET not in view and "pw-secret" not in view and TOKEN not in view
    assert "https://u:***@h/v1?api_key=***&x=1" in view
    assert QUERY_SECRET not in repr(ProviderConfig(url=settings.provider_url or "", token=TOKEN))


def test_a_short_database_password_does_not_mangle_the_message() -> None:
    exc = RuntimeError('connection to server at "db" port 1 failed: password=p rejected')
    url = "postgresql+psycopg://alice:p@db:1/x"
    shown = describe_db_error(exc, url=url)
    assert shown == 'connection to server at "db" port 1 failed: password=*** rejected'


def test_retry_keys_follow_what_the_provider_may_have_done() -> None:
    def key(**message: Any) -> str | None:
        return retry_key(message, "req-own")

    assert key(error_class="ProviderUnavailable", http_status=500) == "req-own"
    assert key(error_class="RequestEnded") == "req-own"
    assert key(error_class="TransientRetriesExhausted") == "req-own"
    assert key(error_class="ProviderUnavailable", idempotency_key="req-first") == "req-first"
    assert key(error_class="UnknownUser") is None
    assert key(error_class="InvalidUserId") is None
    assert key(error_class="ProviderRefused", http_status=400) is None
    assert key(error_class="ProviderRefused", http_status=302) is None


# --- the real CLI against a hostile provider (both backends) -------------------------------


def keys_by_user(provider: FakeProvider) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for call in provider.calls:
        found[str(call.user_id)].append(str(call.key))
    return found


@pytest.mark.parametrize(
    ("hostile", "raw_retry_after", "calls_per_key", "status"),
    [
        ("gzip-500", None, 2, "approved"),  # a 5xx with a bad body is retried
        ("gzip-200", None, 1, "requested"),  # a 2xx with a bad body is accepted
        ("cut-200", None, 1, "requested"),  # ... and one cut short
        ("slam", None, 2, "approved"),
        ("endless-500", None, 2, "approved"),
        ("status-429", "²", 2, "approved"),
        ("status-429", "99999999999", 2, "approved"),  # capped at the 1 s deadline
    ],
)
def test_hostile_answers_through_the_cli(
    cli: Cli, hostile: str, raw_retry_after: str | None, calls_per_key: int, status: str
) -> None:
    users = cli.add_users(1)
    with FakeProvider(hostile=hostile, hostile_calls=1, retry_after_raw=raw_retry_after) as p:
        env = provider_env(p, ACCESSCTL_PROVIDER_DEADLINE="1", ACCESSCTL_PROVIDER_MAX_ATTEMPTS="3")
        result = cli("batch", "2", *user_args(users), "--json", **env)
        calls = list(p.calls)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert cli.scalar("SELECT count(*) FROM errors") == 0
    rows = cli.rows("SELECT request_id, status FROM accesses")
    assert sorted(r[1] for r in rows) == [status, status]
    assert Counter(Counter(c.key for c in calls).values()) == {calls_per_key: 2}
    assert {c.key for c in calls} == {r[0] for r in rows}
    assert TOKEN not in result.stdout + result.stderr


def test_retry_resends_the_original_key_only_where_the_provider_may_have_acted(cli: Cli) -> None:
    flaky, refused = cli.add_users(2)
    unknown = "7e0c3c4e-0000-4000-8000-00000000abcd"
    with FakeProvider(fail=[(500, 4)], flaky_users={flaky}, refuse_users={refused}) as provider:
        env = provider_env(provider, ACCESSCTL_PROVIDER_MAX_ATTEMPTS="2")
        first = cli.json("submit", flaky, refused, unknown, "--json", **env)
        assert (first["recorded"], first["failed"]) == (0, 3)
        original = keys_by_user(provider)
        # Two 500s for the flaky user's request, under one key; one 400 for the other.
        assert len(original[flaky]) == 2 and len(set(original[flaky])) == 1
        assert len(original[refused]) == 1 and unknown not in original
        errors = {e["message"]["user_id"]: e["message"] for e in cli.json("errors", "--json")}
        assert errors[flaky]["error_class"] == "ProviderUnavailable"
        assert errors[flaky]["workflow_id"] == original[flaky][0]
        assert errors[refused]["error_class"] == "ProviderRefused"
        assert errors[unknown]["error_class"] == "UnknownUser"

        # The retry fails too (two more 500s for the same key): a retry of that retry
        # must still present the very first key.
        second = cli.json("retry", first["batch_id"], "--json", **env)
        assert second["failed"] == 3
        # Now the provider answers, the refusal is lifted and the user exists.
        provider.refuse_users.clear()
        provider.fail = []
        result = cli(
            "users", "import", "-", input=f"name,email,id\nLate,late@example.com,{unknown}\n"
        )
        assert result.exit_code == 0, result.stderr
        third = cli.json("retry", second["batch_id"], "--json", **env)
        everything = keys_by_user(provider)
    assert (third["recorded"], third["failed"]) == (3, 0), third
    rows = {r[0] for r in cli.rows("SELECT request_id FROM accesses")}
    assert len(rows) == 3
    # Every call for the flaky user, in all three batches, carried the first request's
    # key (4 x 500, then 200); its access row is keyed by its own new request ID.
    assert everything[flaky] == [original[flaky][0]] * 5
    assert original[flaky][0] not in rows
    # A definite refusal and an unknown user were not filed: their retries are new
    # requests, with new keys (the key of the row each finally got).
    assert len(set(everything[refused])) == 3
    assert everything[refused][-1] in rows
    assert everything[unknown] == [k for k in everything[unknown] if k in rows]
    assert len(everything[unknown]) == 1


def stored_request_args(cli: Cli) -> dict[str, list[Any]]:
    """Each request workflow's stored positional inputs, as DBOS serialized them."""
    import base64
    import pickle

    table = "workflow_input" if cli.database_url.startswith("sqlite") else "dbos.workflow_input"
    found: dict[str, list[Any]] = {}
    for workflow_id, inputs in cli.rows(f"SELECT workflow_uuid, inputs FROM {table}"):
        if workflow_id.startswith("req-"):
            found[workflow_id] = list(pickle.loads(base64.b64decode(inputs))["args"])
    return found


def test_only_a_retry_of_a_possibly_filed_request_stores_a_key(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ordinary request's stored inputs are as the previous release wrote them (so work
    it queued replays unchanged); a retried one appends its original key as the last."""
    # One workflow per request is what is counted: a start a loaded machine made late
    # would be requeued as a workflow of its own (the late branch, tested elsewhere).
    punctual_starts(monkeypatch)
    users = cli.add_users(1)
    with FakeProvider(fail=[(503, 1)]) as provider:
        env = provider_env(provider, ACCESSCTL_PROVIDER_MAX_ATTEMPTS="1")
        first = cli.json("batch", "1", *user_args(users), "--json", **env)
        assert first["failed"] == 1
        before = stored_request_args(cli)
        retried = cli.json("retry", first["batch_id"], "--json", **env)
        assert retried["recorded"] == 1
        keys = [c.key for c in provider.calls]
    [(original_id, original_args)] = before.items()
    assert len(original_args) == 5  # batch_id, user_id, request_id, attempt, retry
    after = {k: v for k, v in stored_request_args(cli).items() if k not in before}
    [retry_args] = after.values()
    assert len(retry_args) == 8 and retry_args[7] == original_id
    assert keys == [original_id, original_id]

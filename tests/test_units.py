"""The pure functions the workflows, the limiter and the CLI decide with: exact values, no
database, no DBOS. Each case pins one branch, so a changed formula fails here in
milliseconds instead of as a timing difference in an integration test."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from accessctl.batch_state import BatchState, batch_state
from accessctl.batches import BatchRequest
from accessctl.exceptions import UsageError
from accessctl.inputs import InvalidInput
from accessctl.limits import SharedLimit, check_configured, planned_limit, queue_polling_interval
from accessctl.progress import eta_seconds
from accessctl.provider import backoff_seconds, call_slack_for, parse_retry_after
from accessctl.queries import parse_since
from accessctl.settings import RateLimit, Settings
from accessctl.workflows import (
    _jitter,
    batch_id_for_key,
    batch_workflow_id,
    follow_interval,
    invalid_input_id,
    request_workflow_id,
    transient_backoff,
)

# --- progress.eta_seconds ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "elapsed", "done", "rate", "expected"),
    [
        (0, 10.0, 5, RateLimit(50, 30.0), 0.0),  # nothing left
        (-3, 10.0, 5, None, 0.0),  # over-counted: still nothing left
        (10, 0.0, 0, RateLimit(50, 30.0), 6.0),  # no pace yet: the limit's bound alone
        (10, 5.0, 5, None, 10.0),  # no limit: the observed pace alone
        (10, 5.0, 5, RateLimit(50, 30.0), 10.0),  # the slower of the two (pace)
        (100, 1.0, 50, RateLimit(50, 30.0), 60.0),  # the slower of the two (limit)
        (10, 5.0, 0, None, None),  # neither: unknown
        (10, 0.0, 3, None, None),  # done but no time elapsed: no pace
    ],
)
def test_eta_seconds(
    remaining: int, elapsed: float, done: int, rate: RateLimit | None, expected: float | None
) -> None:
    assert eta_seconds(remaining, elapsed, done, rate) == expected


# --- provider.backoff_seconds / call_slack_for / parse_retry_after -----------------------


@pytest.mark.parametrize(
    ("attempt", "retry_after", "jitter", "expected"),
    [
        (1, None, 0.0, 0.25),  # base 0.5 s, jitter scales it by [0.5, 1.5)
        (1, None, 0.5, 0.5),
        (3, None, 0.0, 1.0),  # doubles per attempt
        (3, None, 0.5, 2.0),
        (8, None, 0.5, 60.0),  # 0.5 * 2**7 = 64, capped at 60
        (30, None, 0.0, 30.0),  # the cap holds for any attempt
        (1, 5.0, 0.5, 5.0),  # never shorter than Retry-After
        (3, 1.0, 0.5, 2.0),  # a shorter Retry-After does not shorten the backoff
        (1, 0.0, 0.0, 0.25),  # Retry-After 0 is no floor
    ],
)
def test_backoff_seconds(
    attempt: int, retry_after: float | None, jitter: float, expected: float
) -> None:
    assert backoff_seconds(attempt, retry_after, jitter) == expected


@pytest.mark.parametrize(
    ("period", "expected"),
    [(None, 0.5), (1.0, 0.5), (25.0, 0.5), (30.0, 0.6), (40.0, 0.8), (50.0, 1.0), (3600.0, 1.0)],
)
def test_call_slack_for(period: float | None, expected: float) -> None:
    assert call_slack_for(period) == pytest.approx(expected)


# What tests/test_hostile_provider.py already covers (hostile delta-seconds, dates relative
# to now, with a cap) is not repeated: these are the uncapped paths and exact date values.
BILLENNIUM = 1_000_000_000.0  # Sun, 09 Sep 2001 01:46:40 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("007", 7.0),  # leading zeros are still delta-seconds
        ("0" * 40 + "12", 12.0),  # ... however many
        ("9" * 16, None),  # uncapped and beyond float precision: unusable, not inf
        ("Sun, 09 Sep 2001 01:46:52 GMT", 12.0),  # an HTTP date 12 s after now
        ("Sun, 09 Sep 2001 01:46:40 GMT", 0.0),  # exactly now
        ("Sat, 08 Sep 2001 01:46:40 GMT", 0.0),  # in the past: retry at once
        ("Sun, 09 Sep 2001 03:46:40 +0200", 0.0),  # an offset names the same instant
        ("Sun, 09 Sep 2001 01:46:60 GMT", None),  # second 60 does not parse
        ("Sun, 32 Sep 2001 01:46:40 GMT", None),  # no such day
        ("Sun, 09 Foo 2001 01:46:40 GMT", None),  # no such month
    ],
)
def test_parse_retry_after_uncapped(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=BILLENNIUM) == expected


def test_parse_retry_after_date_is_capped_and_uses_the_clock_by_default() -> None:
    far = "Fri, 31 Dec 9999 23:59:59 GMT"
    assert parse_retry_after(far, now=BILLENNIUM, cap=300.0) == 300.0
    # Without ``now`` the wait is measured from the real clock: long after 2001.
    assert parse_retry_after("Sun, 09 Sep 2001 01:46:52 GMT") == 0.0
    assert (parse_retry_after(far) or 0.0) > 10**10


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "poll", "expected"),
    [
        (None, 1.0, 0.02),  # no limiter: poll often so free slots refill
        (None, 0.01, 0.01),  # ... unless configured faster still
        (RateLimit(10, 2.0), 1.0, 0.04),  # 2% of the period
        (RateLimit(50, 30.0), 1.0, 0.6),
        (RateLimit(50, 30.0), 0.1, 0.1),  # never slower than the configured interval
        (RateLimit(5, 0.5), 1.0, 0.02),  # never faster than 0.02 s
    ],
)
def test_queue_polling_interval(rate: RateLimit | None, poll: float, expected: float) -> None:
    assert queue_polling_interval(rate, poll) == pytest.approx(expected)


def test_planned_limit_widens_the_window_only_with_a_provider() -> None:
    rate = RateLimit(50, 30.0)
    with_provider = planned_limit(rate, 10, with_provider=True, poll_interval=1.0)
    assert (with_provider.rate_limit, with_provider.concurrency) == (rate, 10)
    assert with_provider.call_slack == pytest.approx(0.6)
    assert with_provider.polling_interval == pytest.approx(0.6)
    assert with_provider.window == pytest.approx(30.6)
    without = planned_limit(rate, 10, with_provider=False, poll_interval=1.0)
    assert (without.rate_limit, without.concurrency, without.call_slack) == (rate, 10, 0.0)
    assert without.polling_interval == pytest.approx(0.6)
    assert without.window == 30.0
    lifted = planned_limit(None, 4, with_provider=True, poll_interval=1.0)
    assert lifted == SharedLimit(None, 4, 0.0, 0.02)
    assert lifted.window is None
    assert lifted.describe() == "none (concurrency 4)"
    assert without.describe() == "50/30 (concurrency 10)"


DEFAULT_RATE = RateLimit(50, 30.0)


def _settings(
    rate: RateLimit | None = DEFAULT_RATE,
    concurrency: int = 10,
    sources: dict[str, str] | None = None,
) -> Settings:
    return Settings(
        database_url="sqlite://",
        database_url_source="test",
        rate_limit=rate,
        concurrency=concurrency,
        sources=dict(sources or {}),
    )


SHARED = SharedLimit(RateLimit(50, 30.0), 10, 0.6, 0.6)


@pytest.mark.parametrize(
    "settings",
    [
        _settings(),  # the defaults follow whatever is stored
        _settings(RateLimit(1000, 1.0), 99),  # differing, but only by default: followed
        _settings(RateLimit(50, 30.0), 10, {"rate_limit": "--rate-limit", "concurrency": "env"}),
        _settings(
            RateLimit(50, 30.0000001), sources={"rate_limit": "env"}
        ),  # float noise is the same
    ],
)
def test_check_configured_accepts(settings: Settings) -> None:
    check_configured(settings, SHARED)


@pytest.mark.parametrize(
    ("settings", "shared", "words"),
    [
        (
            _settings(RateLimit(1000, 1.0), sources={"rate_limit": "--rate-limit"}),
            SHARED,
            "rate limit 1000/1 (from --rate-limit) differs from the shared limit 50/30",
        ),
        (
            _settings(None, sources={"rate_limit": "ACCESSCTL_RATE_LIMIT"}),
            SHARED,
            "rate limit none (from ACCESSCTL_RATE_LIMIT) differs from the shared limit 50/30",
        ),
        (
            _settings(RateLimit(50, 30.0), sources={"rate_limit": "config"}),
            SharedLimit(None, 10, 0.0, 0.02),
            "rate limit 50/30 (from config) differs from the shared limit none",
        ),
        (
            _settings(concurrency=3, sources={"concurrency": "--concurrency"}),
            SHARED,
            "concurrency 3 (from --concurrency) differs from the shared concurrency 10",
        ),
    ],
)
def test_check_configured_refuses(settings: Settings, shared: SharedLimit, words: str) -> None:
    with pytest.raises(UsageError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        check_configured(settings, shared)


def test_check_configured_with_both_lifted_accepts() -> None:
    check_configured(
        _settings(None, sources={"rate_limit": "env"}), SharedLimit(None, 10, 0.0, 0.02)
    )


# --- workflows: backoff, follow interval, jitter, IDs ------------------------------------


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(0, 0.0, 0.25), (0, 0.5, 0.375), (1, 0.0, 0.5), (3, 0.5, 3.0), (7, 0.0, 32.0)],
)
def test_transient_backoff(attempt: int, jitter: float, expected: float) -> None:
    assert transient_backoff(attempt, jitter) == expected
    # Full range: between half and all of the exponential step.
    assert 0.25 * 2**attempt <= transient_backoff(attempt, 0.999999) < 0.5 * 2**attempt


@pytest.mark.parametrize(
    ("poll", "total", "expected"),
    [(0.05, 10, 0.05), (0.05, 50_000, 0.5), (0.05, 10**6, 1.0), (2.0, 10, 1.0), (0.5, 1, 0.5)],
)
def test_follow_interval(poll: float, total: int, expected: float) -> None:
    assert follow_interval(poll, total) == expected


def test_jitter_is_deterministic_per_request_and_attempt() -> None:
    rid = "req-b-0000000"
    # Pinned: a replay after an upgrade must schedule the very same retry.
    assert _jitter(rid, 1) == 0.9405981581658125
    assert _jitter(rid, 2) == 0.23078597290441394
    assert _jitter(rid, 1) == _jitter(rid, 1)
    values = [_jitter(f"req-b-{i:07d}", 1) for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == len(values)
    # Spread over [0, 1): no request's retries bunch at one end.
    assert 0.45 < sum(values) / len(values) < 0.55
    assert min(values) < 0.01 and max(values) > 0.99


def test_workflow_ids() -> None:
    assert batch_workflow_id("b1") == "batch-b1"
    assert request_workflow_id("b1", 7) == "req-b1-0000007"
    assert request_workflow_id("b1", 1234567) == "req-b1-1234567"
    assert invalid_input_id("b1", 0) == "invalid-b1-0000000"
    # Fixed width: IDs sort in filing order up to ten million requests.
    ids = [request_workflow_id("b", i) for i in (2, 10, 100)]
    assert ids == sorted(ids)


def test_batch_id_for_key_is_a_stable_uuid_per_key() -> None:
    bid = batch_id_for_key("nightly-2026-11-28")
    assert bid == str(uuid.uuid5(uuid.NAMESPACE_URL, "accessctl:batch-key:nightly-2026-11-28"))
    assert bid == str(uuid.UUID(bid))  # canonical form
    assert uuid.UUID(bid).version == 5
    assert batch_id_for_key("nightly-2026-11-28") == bid
    assert batch_id_for_key("nightly-2026-11-29") != bid
    assert batch_id_for_key("Nightly-2026-11-28") != bid  # keys are case-sensitive


# --- batch_state: every branch ------------------------------------------------------------


def _state(**overrides: object) -> BatchState:
    args: dict[str, object] = {
        "stored": None,
        "complete": False,
        "cancelled": False,
        "follower_status": "PENDING",
        "follower_alive": True,
        "requests_in_flight": True,
        "started": False,
    }
    args.update(overrides)
    return batch_state(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # A stored state wins over everything live.
        ({"stored": "done", "complete": False, "cancelled": True}, BatchState.DONE),
        ({"stored": "failed", "follower_status": "PENDING"}, BatchState.FAILED),
        ({"stored": "cancelled"}, BatchState.CANCELLED),
        # Every request has its row.
        ({"complete": True}, BatchState.DONE),
        ({"complete": True, "cancelled": True}, BatchState.CANCELLED),
        ({"complete": True, "follower_status": None}, BatchState.DONE),
        # Cancelled with requests still to be recorded.
        ({"cancelled": True}, BatchState.CANCELLING),
        ({"cancelled": True, "follower_status": "SUCCESS"}, BatchState.CANCELLING),
        # The follower waits on its queue.
        ({"follower_status": "ENQUEUED", "follower_alive": None}, BatchState.QUEUED),
        ({"follower_status": "DELAYED", "follower_alive": None}, BatchState.QUEUED),
        # ... while its requests already run (they can be claimed first): it has started.
        (
            {"follower_status": "ENQUEUED", "follower_alive": None, "started": True},
            BatchState.RUNNING,
        ),
        (
            {"follower_status": "ENQUEUED", "started": True, "anyone_executing": True},
            BatchState.RUNNING,
        ),
        # ... and the run that started them died before its follower was claimed, with
        # no executor left alive: interrupted. Not started, it is merely queued.
        (
            {"follower_status": "ENQUEUED", "started": True, "anyone_executing": False},
            BatchState.INTERRUPTED,
        ),
        (
            {"follower_status": "ENQUEUED", "started": False, "anyone_executing": False},
            BatchState.QUEUED,
        ),
        # The follower runs: on a live executor, or one that died.
        ({"follower_status": "PENDING", "follower_alive": True}, BatchState.RUNNING),
        ({"follower_status": "PENDING", "follower_alive": False}, BatchState.INTERRUPTED),
        ({"follower_status": "PENDING", "follower_alive": None}, BatchState.INTERRUPTED),
        # Nobody follows it: running while its requests still are, else failed.
        ({"follower_status": None, "requests_in_flight": True}, BatchState.RUNNING),
        ({"follower_status": None, "requests_in_flight": False}, BatchState.FAILED),
        ({"follower_status": "SUCCESS", "requests_in_flight": False}, BatchState.FAILED),
        ({"follower_status": "ERROR", "requests_in_flight": False}, BatchState.FAILED),
        ({"follower_status": "CANCELLED", "requests_in_flight": True}, BatchState.RUNNING),
        (
            {"follower_status": "MAX_RECOVERY_ATTEMPTS_EXCEEDED", "requests_in_flight": False},
            BatchState.FAILED,
        ),
        # A status this release does not know: assume it still runs.
        ({"follower_status": "SOMETHING_NEW", "requests_in_flight": False}, BatchState.RUNNING),
    ],
)
def test_batch_state(overrides: dict[str, object], expected: BatchState) -> None:
    assert _state(**overrides) is expected


def test_batch_state_rejects_an_unknown_stored_state() -> None:
    with pytest.raises(ValueError):
        _state(stored="exploded")


# --- queries.parse_since ------------------------------------------------------------------

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", NOW - timedelta(seconds=45)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        (" 30 m ", NOW - timedelta(minutes=30)),  # spaces around and between
        ("0s", NOW),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),  # a date: UTC midnight
        ("2026-11-01T10:00:00", datetime(2026, 11, 1, 10, tzinfo=UTC)),  # naive: UTC
        ("2026-11-01T10:00:00Z", datetime(2026, 11, 1, 10, tzinfo=UTC)),
        ("2026-11-01T10:00:00+02:00", datetime(2026, 11, 1, 8, tzinfo=UTC)),  # east of UTC
        ("2026-11-01T10:00:00-05:30", datetime(2026, 11, 1, 15, 30, tzinfo=UTC)),  # west
        ("2026-11-01T23:30:00-01:00", datetime(2026, 11, 2, 0, 30, tzinfo=UTC)),  # next day
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    parsed = parse_since(text, NOW)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)  # always compared in UTC


def test_parse_since_defaults_to_the_clock() -> None:
    before = datetime.now(UTC)
    parsed = parse_since("1h")
    assert before - timedelta(hours=1) <= parsed <= datetime.now(UTC) - timedelta(hours=1)


@pytest.mark.parametrize(
    "text",
    ["999999999999w", "99999999999d", "999999999999h"],  # beyond year 1 or timedelta's range
)
def test_parse_since_overflow(text: str) -> None:
    with pytest.raises(UsageError, match=f"^--since '{text}' reaches back too far$"):
        parse_since(text, NOW)


@pytest.mark.parametrize(
    "text",
    ["yesterday", "30", "30x", "-5m", "1.5h", "1234567890123s", "", "2026-13-01", "٣m"],
)
def test_parse_since_bad_input(text: str) -> None:
    with pytest.raises(UsageError, match=r"is not a duration \(30m, 2h, 7d\) or an ISO date/time"):
        parse_since(text, NOW)


def test_parse_since_names_its_option_and_cuts_long_input() -> None:
    with pytest.raises(UsageError) as info:
        parse_since("x" * 100, NOW, option="--older-than")
    assert str(info.value).startswith(f"--older-than '{'x' * 40}' is not")


# --- BatchRequest.input_digest ---------------------------------------------------------


def _digest(user_ids: list[str], invalid: tuple[str, ...] = ()) -> str:
    refused = [InvalidInput(line=i + 1, text=t, reason="not a UUID") for i, t in enumerate(invalid)]
    return BatchRequest(user_ids=user_ids, invalid=refused, key="k").input_digest()


def test_input_digest_is_the_same_for_the_same_input() -> None:
    assert _digest(["a", "b"], ("x",)) == _digest(["a", "b"], ("x",))
    assert len(_digest(["a"])) == 64  # SHA-256, hex
    # Where a refused line was is not part of the input's identity, its text is.
    one = BatchRequest(["a"], [InvalidInput(1, "x", "r")], "k").input_digest()
    other = BatchRequest(["a"], [InvalidInput(9, "x", "other reason", "argument")], "k")
    assert one == other.input_digest()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((["a", "b"], ()), (["b", "a"], ())),  # order matters
        ((["a"], ()), (["a", "a"], ())),  # so does the count
        ((["ab"], ()), (["a", "b"], ())),  # IDs are delimited
        ((["a"], ()), (["a"], ("x",))),  # refused lines count
        ((["a"], ("x",)), (["a"], ("y",))),
        ((["a", "x"], ()), (["a"], ("x",))),  # an ID is not a refused line
        ((["a"], ("x", "y")), (["a"], ("y", "x"))),
    ],
)
def test_input_digest_differs(
    first: tuple[list[str], tuple[str, ...]], second: tuple[list[str], tuple[str, ...]]
) -> None:
    assert _digest(*first) != _digest(*second)

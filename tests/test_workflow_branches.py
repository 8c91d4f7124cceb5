"""Every branch of one provider attempt (``workflows._provider_attempt``) and of
``file_request``, in isolation, in the style of DBOS's widget-store demo tests: the step
(``call_provider_step``), the transactions (``_run_tx``) and the re-enqueue
(``_enqueue_next``) are patched, and the test asserts which were called, with exactly which
arguments. No DBOS launch, no database: milliseconds each.

The transactions themselves (``_check_request``, ``_record_access``, ``_record_error``) are
tested below against a database with the application tables only: in-memory SQLite and,
with a Postgres URL, a fresh Postgres database (where ``_record_access`` is one statement)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from accessctl import workflows
from accessctl.models import Access, AccessStatus, Base, Batch, Error, User, utcnow
from accessctl.provider import ProviderConfig, backoff_seconds
from conftest import BACKENDS, create_postgres_database, drop_postgres_database

BATCH = "6262a6aa-610e-4352-8d41-90ee08dbdb8e"
USER = "00000000-0000-0000-0000-000000000001"
RID = f"req-{BATCH}-0000000"
POLICY = {"max_attempts": 5.0, "deadline": 300.0}
PROVIDER = ProviderConfig(url="http://provider.invalid/access", token=None)


def answer(outcome: str, **fields: Any) -> dict[str, Any]:
    return {"outcome": outcome, "http_status": None, "retry_after": None, "detail": "", **fields}


class Patched:
    """The collaborators of one attempt, patched."""

    def __init__(self, step: mock.MagicMock, tx: mock.MagicMock, enqueue: mock.MagicMock):
        self.step, self.tx, self.enqueue = step, tx, enqueue


@pytest.fixture
def patched() -> Iterator[Patched]:
    workflows.bind(mock.MagicMock(name="engine"), 0.05, PROVIDER)
    try:
        with (
            mock.patch.object(workflows, "call_provider_step") as step,
            mock.patch.object(workflows, "_run_tx") as tx,
            mock.patch.object(workflows, "_enqueue_next") as enqueue,
        ):
            yield Patched(step, tx, enqueue)
    finally:
        workflows.unbind()


def attempt(attempt: int = 1, waited: float = 0.0, tries: int = 1, key: str | None = None) -> str:
    return workflows._provider_attempt(BATCH, USER, RID, attempt, POLICY, tries, waited, key)


def assert_recorded_with(tx_call: Any, outcome: str) -> None:
    """The second transaction: ``_record_access`` for an answer the provider gave, which
    must be written even if the batch was cancelled meanwhile (``before_call=False``)."""
    transaction, *args = tx_call.args
    assert isinstance(transaction, functools.partial)
    assert transaction.func is workflows._record_access
    assert transaction.keywords == {"before_call": False}
    assert transaction.args == ()
    assert args == [RID, BATCH, USER, outcome]


@pytest.mark.parametrize("outcome", ["approved", "rejected", "requested"])
def test_an_answer_is_recorded_as_an_access(patched: Patched, outcome: str) -> None:
    patched.tx.side_effect = ["ready", "recorded"]
    patched.step.return_value = answer(outcome, http_status=200)
    assert attempt(key="req-old-0000003") == "recorded"
    assert patched.tx.call_args_list[0] == mock.call(workflows._check_request, RID, BATCH, USER)
    patched.step.assert_called_once_with(RID, USER, BATCH, "req-old-0000003")
    assert patched.tx.call_count == 2
    assert_recorded_with(patched.tx.call_args_list[1], outcome)
    patched.enqueue.assert_not_called()


def test_a_refusal_is_recorded_as_an_error_with_its_status(patched: Patched) -> None:
    patched.tx.side_effect = ["ready", "failed"]
    patched.step.return_value = answer("refused", http_status=403, detail="no such team")
    assert attempt(attempt=2) == "failed"
    patched.step.assert_called_once_with(RID, USER, BATCH, None)
    assert patched.tx.call_args_list[1] == mock.call(
        workflows._record_error,
        RID,
        BATCH,
        {
            "batch_id": BATCH,
            "workflow_id": RID,
            "user_id": USER,
            "error_class": "ProviderRefused",
            "detail": "no such team",
            "sqlstate": None,
            "http_status": 403,
            "attempt": 2,
        },
    )
    patched.enqueue.assert_not_called()


def test_a_transient_answer_is_retried_through_the_queue_after_its_backoff(
    patched: Patched,
) -> None:
    patched.tx.return_value = "ready"
    patched.step.return_value = answer("transient", http_status=503, retry_after=None)
    assert attempt(attempt=2, waited=1.5, tries=3, key="k") == "requeued"
    delay = backoff_seconds(2, None, workflows._jitter(RID, 2))
    assert delay == 0.5 * 2 ** (2 - 1) * (0.5 + workflows._jitter(RID, 2))
    # The next attempt, its accumulated wait, and the delay before the queue admits it.
    patched.enqueue.assert_called_once_with(BATCH, USER, RID, 3, POLICY, 3, 1.5 + delay, delay, "k")
    patched.tx.assert_called_once_with(workflows._check_request, RID, BATCH, USER)


def test_a_transient_answer_waits_at_least_its_retry_after(patched: Patched) -> None:
    patched.tx.return_value = "ready"
    patched.step.return_value = answer("transient", http_status=429, retry_after=42.0)
    assert attempt() == "requeued"
    patched.enqueue.assert_called_once_with(BATCH, USER, RID, 2, POLICY, 1, 42.0, 42.0, None)


def test_the_last_attempt_gives_up_as_provider_unavailable(patched: Patched) -> None:
    patched.tx.side_effect = ["ready", "failed"]
    patched.step.return_value = answer("transient", http_status=502, detail="bad gateway")
    assert attempt(attempt=5, waited=10.0, key="k0") == "failed"
    patched.enqueue.assert_not_called()
    assert patched.tx.call_args_list[1] == mock.call(
        workflows._record_error,
        RID,
        BATCH,
        {
            "batch_id": BATCH,
            "workflow_id": RID,
            "user_id": USER,
            "error_class": "ProviderUnavailable",
            "detail": "gave up after 5 attempt(s): bad gateway",
            "sqlstate": None,
            "http_status": 502,
            "attempt": 5,
            "idempotency_key": "k0",
        },
    )


def test_a_retry_past_the_deadline_gives_up_at_once(patched: Patched) -> None:
    patched.tx.side_effect = ["ready", "failed"]
    # Attempts are left, but the provider's wait would end past the deadline.
    patched.step.return_value = answer("transient", http_status=503, retry_after=61.0)
    assert attempt(attempt=2, waited=240.0) == "failed"
    patched.enqueue.assert_not_called()
    message = patched.tx.call_args_list[1].args[3]
    assert message["error_class"] == "ProviderUnavailable"
    assert message["detail"] == "gave up after 2 attempt(s): no answer"
    assert message["attempt"] == 2


def test_a_retry_exactly_at_the_deadline_is_still_made(patched: Patched) -> None:
    patched.tx.return_value = "ready"
    patched.step.return_value = answer("transient", retry_after=60.0)
    assert attempt(attempt=2, waited=240.0) == "requeued"
    patched.enqueue.assert_called_once_with(BATCH, USER, RID, 3, POLICY, 1, 300.0, 60.0, None)


def test_a_late_start_is_requeued_without_spending_an_attempt(patched: Patched) -> None:
    patched.tx.return_value = "ready"
    patched.step.return_value = answer("late")
    assert attempt(attempt=3, waited=7.0, tries=4, key="k") == "requeued"
    # Same attempt number, same wait so far, no delay: only the try count moves on.
    patched.enqueue.assert_called_once_with(BATCH, USER, RID, 3, POLICY, 4, 7.0, 0.0, "k")
    patched.tx.assert_called_once()


@pytest.mark.parametrize("state", ["recorded", "failed"])
def test_a_request_with_its_row_or_a_cancelled_batch_calls_nobody(
    patched: Patched, state: str
) -> None:
    # "failed" is also what _check_request returns once it wrote a Cancelled row (below).
    patched.tx.return_value = state
    assert attempt() == state
    patched.tx.assert_called_once_with(workflows._check_request, RID, BATCH, USER)
    patched.step.assert_not_called()
    patched.enqueue.assert_not_called()


# --- file_request, the workflow's body (called unwrapped: no DBOS) ----------------------

file_request_body = workflows.file_request.__wrapped__  # type: ignore[attr-defined]


def test_file_request_without_a_provider_records_the_request(patched: Patched) -> None:
    workflows.bind(mock.MagicMock(name="engine"), 0.05, None)
    patched.tx.return_value = "recorded"
    assert file_request_body(BATCH, USER, RID) == {"outcome": "recorded"}
    patched.tx.assert_called_once_with(workflows._record_access, RID, BATCH, USER)
    patched.step.assert_not_called()


def test_file_request_with_a_provider_runs_one_attempt_with_a_default_policy(
    patched: Patched,
) -> None:
    with mock.patch.object(workflows, "_provider_attempt", return_value="requeued") as one:
        result = file_request_body(BATCH, USER, RID, 2, None, 3, 1.0, "k")
    assert result == {"outcome": "requeued", "attempt": 2}
    # Inputs stored without a policy (older releases) get one attempt and no waiting.
    one.assert_called_once_with(
        BATCH, USER, RID, 2, {"max_attempts": 1, "deadline": 0.0}, 3, 1.0, "k"
    )


def test_file_request_records_a_database_failure_as_its_error_row(patched: Patched) -> None:
    fault = OperationalError("INSERT", {}, Exception("disk I/O error"))
    with (
        mock.patch.object(workflows, "_provider_attempt", side_effect=fault),
        mock.patch.object(workflows, "_database_failure", return_value="failed") as failure,
    ):
        result = file_request_body(BATCH, USER, RID, 1, POLICY, 1, 0.0, "k")
    assert result == {"outcome": "failed"}
    failure.assert_called_once_with(RID, BATCH, USER, fault, "k")


def test_file_request_raises_what_is_not_a_database_error(patched: Patched) -> None:
    with (
        mock.patch.object(workflows, "_provider_attempt", side_effect=KeyError("bug")),
        mock.patch.object(workflows, "_database_failure") as failure,
        pytest.raises(KeyError),
    ):
        file_request_body(BATCH, USER, RID, 1, POLICY)
    failure.assert_not_called()


# --- _run_tx: transient faults retried with backoff, others raised ---------------------


def test_run_tx_retries_transient_faults_then_returns() -> None:
    transient = OperationalError("SELECT", {}, Exception("server closed the connection"))
    transaction = mock.Mock(side_effect=[transient, transient, "recorded"])
    with mock.patch("accessctl.workflows.time.sleep") as sleep:
        assert workflows._run_tx(transaction, "a", "b") == "recorded"
    assert transaction.call_args_list == [mock.call("a", "b")] * 3
    # Two backoffs, the second in the doubled range.
    waits = [c.args[0] for c in sleep.call_args_list]
    assert len(waits) == 2
    assert 0.25 <= waits[0] < 0.5 and 0.5 <= waits[1] < 1.0


def test_run_tx_gives_up_after_its_attempts_without_a_last_sleep() -> None:
    transient = OperationalError("SELECT", {}, Exception("server closed the connection"))
    transaction = mock.Mock(side_effect=transient)
    with mock.patch("accessctl.workflows.time.sleep") as sleep, pytest.raises(OperationalError):
        workflows._run_tx(transaction)
    assert transaction.call_count == workflows.TRANSIENT_ATTEMPTS
    assert sleep.call_count == workflows.TRANSIENT_ATTEMPTS - 1


def test_run_tx_raises_a_permanent_fault_at_once() -> None:
    transaction = mock.Mock(side_effect=ValueError("bad"))
    with mock.patch("accessctl.workflows.time.sleep") as sleep, pytest.raises(ValueError):
        workflows._run_tx(transaction)
    transaction.assert_called_once_with()
    sleep.assert_not_called()


# --- the transactions, on an in-memory database ----------------------------------------


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """The application tables on a private in-memory SQLite database (one connection), or
    on a fresh Postgres database, where ``_record_access`` takes its one-statement path."""
    name = None
    if request.param == "sqlite":
        engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    else:
        name, url = create_postgres_database()
        engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.insert(User).values(id=uuid.UUID(USER), name="Ada", email="a@e.x"))
        conn.execute(
            sa.insert(Batch).values(id=uuid.UUID(BATCH), key=None, total=2, created_at=now)
        )
    workflows.bind(engine, 0.05, None)
    try:
        yield engine
    finally:
        workflows.unbind()
        engine.dispose()
        if name is not None:
            drop_postgres_database(name)


def rows(engine: sa.Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as conn:
        accesses = list(conn.execute(sa.select(Access.request_id, Access.status)))
        errors = list(conn.execute(sa.select(Error.request_id, Error.message)))
    return accesses, errors


def cancel(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(Batch).values(cancelled_at=utcnow()))


def test_check_request_is_ready_for_a_known_user(engine: sa.Engine) -> None:
    assert workflows._check_request(RID, BATCH, USER) == "ready"
    assert rows(engine) == ([], [])


def test_check_request_records_an_unknown_user_once(engine: sa.Engine) -> None:
    stranger = str(uuid.uuid4())
    assert workflows._check_request(RID, BATCH, stranger) == "failed"
    assert workflows._check_request(RID, BATCH, stranger) == "failed"  # a replay
    _, errors = rows(engine)
    assert [(r, m["error_class"], m["user_id"]) for r, m in errors] == [
        (RID, "UnknownUser", stranger)
    ]


def test_check_request_of_a_cancelled_batch_records_cancelled(engine: sa.Engine) -> None:
    cancel(engine)
    assert workflows._check_request(RID, BATCH, USER) == "failed"
    _, errors = rows(engine)
    assert [(r, m["error_class"]) for r, m in errors] == [(RID, "Cancelled")]


def test_record_access_writes_once_and_after_a_call_ignores_cancelling(
    engine: sa.Engine,
) -> None:
    assert workflows._record_access(RID, BATCH, USER, "approved") == "recorded"
    assert workflows._record_access(RID, BATCH, USER, "approved") == "recorded"  # a replay
    cancel(engine)
    other = f"req-{BATCH}-0000001"
    # The provider acted before the cancel: its answer is kept, not replaced by Cancelled.
    assert workflows._record_access(other, BATCH, USER, "rejected", before_call=False) == (
        "recorded"
    )
    accesses, errors = rows(engine)
    assert sorted((r, AccessStatus(s)) for r, s in accesses) == [
        (RID, AccessStatus.APPROVED),
        (other, AccessStatus.REJECTED),
    ]
    assert errors == []


def test_record_access_before_a_call_in_a_cancelled_batch_records_cancelled(
    engine: sa.Engine,
) -> None:
    cancel(engine)
    assert workflows._record_access(RID, BATCH, USER) == "failed"
    accesses, errors = rows(engine)
    assert accesses == [] and [m["error_class"] for _, m in errors] == ["Cancelled"]


def test_record_access_of_an_unknown_user_or_a_failed_request_writes_no_access(
    engine: sa.Engine,
) -> None:
    stranger = str(uuid.uuid4())
    assert workflows._record_access(RID, BATCH, stranger) == "failed"
    assert workflows._record_access(RID, BATCH, stranger) == "failed"  # a replay
    other = f"req-{BATCH}-0000001"
    assert workflows._record_error(other, BATCH, {"error_class": "X"}) == "failed"
    assert workflows._record_access(other, BATCH, USER) == "failed"  # its outcome stands
    accesses, errors = rows(engine)
    assert accesses == []
    assert sorted((r, m["error_class"]) for r, m in errors) == [
        (RID, "UnknownUser"),
        (other, "X"),
    ]


def test_record_error_keeps_the_first_outcome(engine: sa.Engine) -> None:
    assert workflows._record_access(RID, BATCH, USER) == "recorded"
    assert workflows._record_error(RID, BATCH, {"error_class": "Late"}) == "recorded"
    other = f"req-{BATCH}-0000001"
    assert workflows._record_error(other, BATCH, {"error_class": "X"}) == "failed"
    assert workflows._record_error(other, BATCH, {"error_class": "Y"}) == "failed"
    _, errors = rows(engine)
    assert [(r, m) for r, m in errors] == [(other, {"error_class": "X"})]

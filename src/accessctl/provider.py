"""The downstream access provider: one HTTP call per attempt, classified.

Each request's call carries ``Idempotency-Key: <request ID>``, the request's durable ID,
identical on every retry and every replay after a crash, so a provider that honours the
header applies each request once however often it is called. Retrying is not done here:
every attempt goes back through the rate-limited queue (see ``workflows.run_batch``), so
retries never push the call rate above the limit.
"""

from __future__ import annotations

import email.utils
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import httpx

Outcome = Literal["approved", "rejected", "requested", "transient", "refused", "late"]

MAX_DETAIL = 300  # characters of a provider's message kept in an errors row


@dataclass(frozen=True)
class ProviderConfig:
    url: str
    token: str | None  # never logged, never stored: held only in this process's memory
    timeout: float = 10.0
    max_attempts: int = 5
    deadline: float = 300.0  # seconds from the first attempt; then the request fails
    # Longest a call may follow its rate-limited start; the queue's window is widened by
    # as much, so that calls (not just starts) respect the limit. See workflows.py.
    call_slack: float = 0.5

    def __repr__(self) -> str:  # keep the token out of any accidental repr in logs
        return f"ProviderConfig(url={self.url!r}, token={'***' if self.token else None})"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_client_lock = threading.Lock()
_clients: dict[float, httpx.Client] = {}


def _client(timeout: float) -> httpx.Client:
    """One pooled client per process: reused connections keep call latency low."""
    import httpx

    with _client_lock:
        if timeout not in _clients:
            _clients[timeout] = httpx.Client(
                timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
                follow_redirects=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
        return _clients[timeout]


def warm_up(timeout: float) -> None:
    """Build the HTTP client (imports, TLS context) before the first rate-limited call, so
    that call is not late."""
    _client(timeout)


def call_slack_for(period: float | None) -> float:
    """Half a second, or 2% of a long period (0.6 s at 50/30), at most 1 s."""
    return 0.5 if period is None else max(0.5, min(1.0, period * 0.02))


def call_provider(
    config: ProviderConfig, *, request_id: str, user_id: str, batch_id: str
) -> dict[str, Any]:
    """Make one call. Returns plain data (it is checkpointed as a DBOS step's result):
    ``outcome``, ``http_status``, ``retry_after`` and ``detail``."""
    import httpx

    headers = {"Idempotency-Key": request_id, "Content-Type": "application/json"}
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    body = {"request_id": request_id, "user_id": user_id, "batch_id": batch_id}
    try:
        response = _client(config.timeout).post(config.url, json=body, headers=headers)
    except httpx.TimeoutException as exc:
        return _result("transient", None, None, f"timeout: {type(exc).__name__}")
    except httpx.TransportError as exc:
        return _result("transient", None, None, f"transport error: {type(exc).__name__}")
    status = response.status_code
    if 200 <= status < 300:
        reported = None
        try:
            data = response.json()
            reported = data.get("status") if isinstance(data, dict) else None
        except ValueError:
            pass
        if reported in ("approved", "rejected"):
            return _result(reported, status, None, "")
        return _result("requested", status, None, "")
    detail = response.text[:MAX_DETAIL]
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return _result("transient", status, retry_after, detail)
    return _result("refused", status, None, detail)


def _result(
    outcome: Outcome, status: int | None, retry_after: float | None, detail: str
) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "http_status": status,
        "retry_after": retry_after,
        "detail": detail.replace("\x00", "")[:MAX_DETAIL],
    }


def backoff_seconds(attempt: int, retry_after: float | None, jitter: float) -> float:
    """Exponential backoff with jitter (``jitter`` in [0, 1)), never shorter than the
    provider's ``Retry-After``."""
    base = min(60.0, 0.5 * 2 ** (attempt - 1))
    delay = base * (0.5 + jitter)
    return float(max(delay, retry_after or 0.0))

"""The downstream access provider: one HTTP call per attempt, classified.

Each request's call carries ``Idempotency-Key: <request ID>``, the request's durable ID,
identical on every retry and every replay after a crash, so a provider that honours the
header applies each request once however often it is called. Retrying is not done here:
every attempt goes back through the rate-limited queue (see ``workflows.run_batch``), so
retries never push the call rate above the limit.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import re
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from accessctl.redact import redact_text, redact_url, url_secrets

if TYPE_CHECKING:
    import httpx

Outcome = Literal["approved", "rejected", "requested", "transient", "refused", "late"]

MAX_DETAIL = 300  # characters of a provider's message kept in an errors row
# Bytes of a provider's answer read at most: an endless body cannot exhaust memory.
MAX_BODY = 64 * 1024


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
        url = redact_url(self.url)
        return f"ProviderConfig(url={url!r}, token={'***' if self.token else None})"


_DELTA_SECONDS = re.compile(r"[0-9]+")  # ASCII digits only: "²".isdigit() is True


def parse_retry_after(
    value: str | None, now: float | None = None, cap: float | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or
    None when it says nothing usable (negative, fractional, NaN, unicode digits, garbage).
    A wait longer than ``cap`` (the provider deadline) is ``cap``: the workflow then gives
    up at once instead of sleeping for a provider's idea of forever."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if _DELTA_SECONDS.fullmatch(value):
        digits = value.lstrip("0") or "0"
        # float() of a 400-digit number is inf and int() of a 5000-digit one raises.
        seconds = float(int(digits)) if len(digits) <= 15 else math.inf
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
        except (TypeError, ValueError, OverflowError, OSError, IndexError):
            return None
    if math.isnan(seconds):
        return None
    if cap is not None:
        return min(seconds, cap)
    return seconds if math.isfinite(seconds) else None


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
    config: ProviderConfig,
    *,
    request_id: str,
    user_id: str,
    batch_id: str,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Make one call. Returns plain data (it is checkpointed as a DBOS step's result):
    ``outcome``, ``http_status``, ``retry_after`` and ``detail``.

    Never raises: whatever the provider or the HTTP client does, the call is classified
    (see ``classify``), and every text that came from the provider is redacted and cut to
    ``MAX_DETAIL`` characters before it is returned, so neither the errors row nor DBOS's
    checkpoint of this step can carry the token the provider may have echoed.

    ``idempotency_key`` is the key of an earlier request this one re-files (``accessctl
    retry`` of a request the provider may have acted on); the call then presents itself as
    that request (header and body ``request_id``), so a provider that did file it does not
    file it twice. Without it, the key is ``request_id``."""
    key = idempotency_key or request_id
    secrets = [config.token, *url_secrets(config.url)]
    try:
        return _call(config, key, user_id, batch_id, secrets)
    except Exception as exc:  # every failure is classified, never raised
        # Only a failure before a status arrived gets here: the provider may or may not
        # have acted, and the same key makes another attempt safe.
        return _result("transient", None, None, _describe(exc, secrets), secrets)


def _call(
    config: ProviderConfig, key: str, user_id: str, batch_id: str, secrets: list[str | None]
) -> dict[str, Any]:
    headers = {
        "Idempotency-Key": key,
        "Content-Type": "application/json",
        # The answer is a few bytes of JSON: ask for it plain (a provider that compresses
        # anyway is still decoded, within bounds, by ``_decode``).
        "Accept-Encoding": "identity",
    }
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    body = {"request_id": key, "user_id": user_id, "batch_id": batch_id}
    started = time.monotonic()
    client = _client(config.timeout)
    response = client.send(
        client.build_request("POST", config.url, json=body, headers=headers), stream=True
    )
    # From here a status has arrived: nothing that goes wrong reading the rest may turn
    # it into something else (a 2xx the provider accepted is accepted).
    status = response.status_code
    reply_headers: dict[str, str] = {}
    raw, problem = b"", ""
    try:
        reply_headers = dict(response.headers.items())
        raw, problem = _read_bounded(response, started + config.timeout)
    except Exception as exc:  # a broken answer is still an answer
        problem = f"unreadable answer: {type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            response.close()  # also drops a connection whose body was not read to the end
    try:
        return classify(status, reply_headers, raw, problem, config=config, secrets=secrets)
    except Exception as exc:  # a bug of ours must not make an accepted call a failed one
        outcome: Outcome = (
            "requested"
            if 200 <= status < 300
            else "refused"
            if 300 <= status < 500
            else "transient"
        )
        if status == 429:
            outcome = "transient"
        return _result(
            outcome, status, None, f"unclassifiable answer: {type(exc).__name__}", secrets
        )


def _read_bounded(response: httpx.Response, deadline: float) -> tuple[bytes, str]:
    """At most ``MAX_BODY`` raw bytes of the body, read until ``deadline`` (each read is
    also bounded by the client's read timeout), and what cut it short, if anything. An
    endless or trickling body is abandoned, never held whole in memory."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_BODY:
                return b"".join(chunks)[:MAX_BODY], f"body cut at {MAX_BODY} bytes"
            if time.monotonic() > deadline:
                return b"".join(chunks), "body still arriving at the timeout"
    except Exception as exc:  # a connection cut mid-body keeps what came
        return b"".join(chunks), f"body cut short: {type(exc).__name__}"
    return b"".join(chunks), ""


def _decode(raw: bytes, encoding: str) -> bytes | None:
    """The body decoded per ``Content-Encoding`` (gzip, deflate, identity), at most
    ``MAX_BODY`` bytes of it (a small compressed body can inflate a thousandfold); None if
    it cannot be decoded (a bad gzip stream, an encoding we did not ask for)."""
    data = raw
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip", "deflate"):
            # gzip framing, zlib framing, or (deflate as some servers send it) raw deflate.
            bits = [16 + zlib.MAX_WBITS] if coding != "deflate" else [zlib.MAX_WBITS, -15]
            for wbits in bits:
                try:
                    data = zlib.decompressobj(wbits).decompress(data, MAX_BODY)
                    break
                except zlib.error:
                    continue
            else:
                return None
            continue
        return None
    return data


def classify(
    status: int,
    headers: dict[str, str],
    raw: bytes,
    problem: str = "",
    *,
    config: ProviderConfig,
    secrets: list[str | None] | None = None,
) -> dict[str, Any]:
    """An answer's outcome:

    * 2xx: ``approved``/``rejected`` if the (decodable, JSON) body's ``status`` says so,
      else ``requested``: the provider accepted the request whatever its body looks like.
    * 429 and 5xx: ``transient`` (retried), with the ``Retry-After`` wait, capped at the
      deadline.
    * 3xx: ``refused``. Redirects are not followed (re-sending the token to wherever a
      response points is how tokens leak), and the same URL will answer the same way, so
      retrying only burns attempts; the detail names the redirect so the operator can fix
      ``ACCESSCTL_PROVIDER_URL``. Nothing was filed, so ``accessctl retry`` uses a new key.
    * other 4xx: ``refused``.
    * anything else (1xx as a final answer, a status outside 100-599): ``transient``, as
      a malformed answer from a provider that may still have acted.
    """
    secrets = secrets if secrets is not None else [config.token, *url_secrets(config.url)]
    lower = {k.lower(): v for k, v in headers.items()}
    decoded = _decode(raw, lower.get("content-encoding", ""))
    if 200 <= status < 300:
        reported = None
        if decoded is not None and not problem:
            with contextlib.suppress(Exception):
                data = json.loads(decoded)
                reported = data.get("status") if isinstance(data, dict) else None
        if reported in ("approved", "rejected"):
            return _result(reported, status, None, "", secrets)
        return _result("requested", status, None, "", secrets)
    if decoded is None:
        text = f"(undecodable body, Content-Encoding: {lower.get('content-encoding', '')})"
    else:
        text = decoded.decode("utf-8", errors="replace")
    if problem:
        # First, so the cut to MAX_DETAIL characters keeps it.
        text = f"[{problem}] {text}" if text else f"[{problem}]"
    if 300 <= status < 400:
        location = redact_url(redact_text(lower.get("location", ""), secrets, limit=None))
        return _result(
            "refused",
            status,
            None,
            f"redirect to {location or '(no Location)'} not followed",
            secrets,
        )
    if status == 429 or 500 <= status < 600:
        retry_after = parse_retry_after(lower.get("retry-after"), cap=config.deadline)
        return _result("transient", status, retry_after, text, secrets)
    if 400 <= status < 500:
        return _result("refused", status, None, text, secrets)
    return _result("transient", status, None, f"unexpected HTTP status {status}: {text}", secrets)


def _describe(exc: Exception, secrets: list[str | None]) -> str:
    import httpx

    kind = (
        "timeout"
        if isinstance(exc, httpx.TimeoutException)
        else "transport error"
        if isinstance(exc, httpx.TransportError)
        else "client error"
    )
    # The message helps ("Connection refused") but may quote the URL: redacted like a body.
    message = redact_text(str(exc), secrets, limit=120)
    return f"{kind}: {type(exc).__name__}" + (f": {message}" if message else "")


def _result(
    outcome: Outcome,
    status: int | None,
    retry_after: float | None,
    detail: str,
    secrets: list[str | None],
) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "http_status": status,
        "retry_after": retry_after,
        "detail": redact_text(detail, secrets, limit=MAX_DETAIL),
    }


def backoff_seconds(attempt: int, retry_after: float | None, jitter: float) -> float:
    """Exponential backoff with jitter (``jitter`` in [0, 1)), never shorter than the
    provider's ``Retry-After``."""
    base = min(60.0, 0.5 * 2 ** (attempt - 1))
    delay = base * (0.5 + jitter)
    return float(max(delay, retry_after or 0.0))

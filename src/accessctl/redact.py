"""Redaction: the one place that decides what a secret looks like and how it is hidden.

Text from outside (a provider's response body, a driver's error message) can quote our own
secrets back at us: a provider that echoes the request's ``Authorization`` header, a driver
that prints its connection string. Such text is redacted here before it is stored in a
row, returned from a checkpointed step, logged or printed.

Two kinds of redaction, both applied by ``redact_text``:

* **Known secrets** (the provider token, a URL's password): hidden wherever they appear.
  A secret of ``MIN_SUBSTRING`` characters or more is replaced as a substring (it is long
  enough to be unambiguous). A shorter one is replaced only as a whole token, delimited by
  characters that are not word characters: blanking every ``p`` of a message whose
  password is ``p`` mangles it and reveals the password by elimination (``***ort 1``).
* **Secret-looking fields**, whatever their value: ``Authorization:`` header lines,
  ``Bearer``/``Basic`` credentials, ``key=value`` / ``"key": "value"`` / ``key: value``
  pairs whose key names a token, secret, password, API key or the like, and the
  ``user:password@`` of a URL. These catch secrets we were never told about.

The result is also bounded in length and stripped of control characters (a provider's
ANSI escapes must not reach an operator's terminal; NUL cannot be stored in Postgres).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"
# Secrets at least this long are replaced wherever they occur; shorter ones only as whole
# tokens (see the module docstring).
MIN_SUBSTRING = 8
DEFAULT_LIMIT = 300

# A key that names a credential: api_key, apiKey, X-Api-Key, access_token, client_secret,
# password, passwd, sslpassword, auth, session, signature, cookie...
_SECRET_KEY = (
    r"[A-Za-z0-9_.\-]{0,40}?(?:passw(?:or)?d|pwd|secret|token|api[_\-]?key|apikey|access[_\-]?key"
    r"|private[_\-]?key|auth(?:orization)?|credentials?|session(?:id)?|cookie|signature|sig)"
    r"[A-Za-z0-9_.\-]{0,40}"
)
_SECRET_KEY_RE = re.compile(rf"^{_SECRET_KEY}$", re.IGNORECASE)

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # A header line: "Authorization: Bearer abc", "Cookie: a=b; c=d" (up to the line's end).
    (
        re.compile(
            r"(?im)^([ \t]*(?:proxy-)?(?:authorization|cookie|set-cookie|x-api-key|api-key"
            r"|x-auth-token)[ \t]*:)[^\r\n]*"
        ),
        rf"\1 {MASK}",
    ),
    # "Bearer abc", "Basic dXNlcjpw" anywhere (an echoed header in JSON).
    (
        re.compile(r"(?i)\b(bearer|basic|digest)(\s+|%20|\+)[A-Za-z0-9._~+/=\-:%]+"),
        rf"\1\2{MASK}",
    ),
    # "key": "value" and 'key': 'value' (JSON, Python reprs); the value may hold spaces.
    # An unclosed value runs to the end of the text (it was cut): hidden all the same, and
    # the match never backtracks.
    (
        re.compile(
            rf"""(?i)(["']{_SECRET_KEY}["']\s*[:=]\s*)(["'])(?:\\.|(?!\2).)*(?:\2|$)""", re.S
        ),
        rf"\1\2{MASK}\2",
    ),
    # key=value, key: value (query strings, conninfo, logs): up to a delimiter.
    (
        re.compile(rf"""(?i)(\b{_SECRET_KEY}\s*[:=]\s*)(?!\s|["']|\*\*\*)[^\s&;,"'<>)\]}}]+"""),
        rf"\1{MASK}",
    ),
    # The userinfo of a URL: scheme://user:password@host -> scheme://user:***@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@?#]*:)[^\s/@?#]+@"), rf"\1{MASK}@"),
]

# C0 controls other than tab and newline, DEL, C1 controls: never shown, never stored.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _variants(secrets: Iterable[str | None]) -> list[str]:
    """Each secret as given and percent-encoded (a URL or an echoed request line carries
    the encoded form), longest first so a longer secret is hidden before its parts."""
    found: set[str] = set()
    for secret in secrets:
        if secret:
            found.update({secret, quote(secret, safe=""), quote(secret, safe="/:")})
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every known secret replaced: long ones as substrings, short ones only
    as whole tokens (not touching a word character on either side)."""
    for secret in _variants(secrets):
        if len(secret) >= MIN_SUBSTRING:
            text = text.replace(secret, MASK)
        else:
            text = re.sub(rf"(?<![\w\-~+%]){re.escape(secret)}(?![\w\-~+%])", MASK, text)
    return text


def redact_text(
    text: str, secrets: Iterable[str | None] = (), *, limit: int | None = DEFAULT_LIMIT
) -> str:
    """``text`` safe to store, log and print: known secrets and secret-looking fields
    hidden, control characters replaced, at most ``limit`` characters. Redaction runs on
    the whole text before it is cut, so a cut never leaves half a secret unredacted."""
    secrets = list(secrets)
    if limit is not None:
        # Only the start can be kept: redact a window a few times longer (so a secret at
        # the cut is whole in it), which bounds the work on a huge body.
        window = limit * 4 + max((len(s) for s in secrets if s), default=0)
        text = text[:window]
    text = scrub_secrets(text, secrets)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    text = _CONTROL.sub("?", text.replace("\r\n", "\n"))
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return text


def is_secret_name(name: str) -> bool:
    """Whether a query parameter (or field) called ``name`` holds a secret."""
    return bool(_SECRET_KEY_RE.match(unquote(name).strip()))


def redact_url(url: str) -> str:
    """An http(s) URL safe to show: the userinfo's password (or a bare userinfo, which is
    usually a token) and every secret-looking query parameter replaced by ``***``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if has_password else f"{MASK}@{hostport}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    fragment = redact_text(parts.fragment, limit=None) if parts.fragment else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def _redact_param(param: str) -> str:
    name, has_value, _ = param.partition("=")
    return f"{name}={MASK}" if has_value and is_secret_name(name) else param


def url_secrets(url: str) -> list[str]:
    """The secrets an http(s) URL carries (userinfo, secret-looking query values), decoded
    and as written, to scrub from any text that may quote them back."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        user, has_password, password = userinfo.partition(":")
        found.extend([password, unquote(password)] if has_password else [user, unquote(user)])
    for param in parts.query.split("&") if parts.query else []:
        name, has_value, value = param.partition("=")
        if has_value and is_secret_name(name):
            found.extend([value, unquote(value.replace("+", " "))])
    return [s for s in found if s]

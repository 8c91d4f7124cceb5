"""Configuration: every setting resolved in one place, in one documented order.

Nothing here runs at import time; ``resolve_settings`` reads the environment and the
config file only when a command asks for it.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from accessctl.exceptions import ConfigError, SettingError

APP_NAME = "accessctl"
CONFIG_FILE_NAME = "dbos-config.yaml"

# The seed's demo users: filed when `submit` is given no IDs.
SEED_USER_IDS: tuple[str, ...] = tuple(f"00000000-0000-0000-0000-00000000000{i}" for i in range(4))

LogFormat = Literal["json", "console"]


@dataclass(frozen=True)
class Bound:
    """A setting's documented range, checked when it is resolved (exit 2 outside it)."""

    label: str  # how messages name the setting
    low: float
    high: float
    unit: str
    kind: type[int] | type[float] = float

    def describe(self) -> str:
        return f"from {_number(self.low)} to {_number(self.high)} {self.unit}"


def _number(value: float) -> str:
    return f"{int(value):,}" if value == int(value) else f"{value:g}"


# Every bounded setting, in one table (README "Configuration" has the same table). The
# bounds keep values inside what the rest of the program can act on: a poll interval of
# 1e308 overflowed the waits, 1e-300 spun, and a huge concurrency or batch was accepted
# by `config` only to fail later. Lengths are in characters.
BOUNDS: dict[str, Bound] = {
    "concurrency": Bound("concurrency", 1, 1000, "requests in flight", int),
    "worker_concurrency": Bound("worker concurrency", 1, 1000, "requests in flight", int),
    "max_batch": Bound("largest batch", 1, 10_000_000, "requests", int),
    "connect_timeout": Bound("connect timeout", 0.1, 300, "seconds"),
    "shutdown_grace": Bound("shutdown grace", 0, 3600, "seconds"),
    "poll_interval": Bound("poll interval", 0.01, 60, "seconds"),
    "provider_timeout": Bound("provider timeout", 0.1, 600, "seconds"),
    "provider_max_attempts": Bound("provider attempts", 1, 100, "attempts", int),
    "provider_deadline": Bound("provider deadline", 1, 86400, "seconds"),
    "rate_limit_limit": Bound("rate limit", 1, 1_000_000, "starts", int),
    "rate_limit_period": Bound("rate limit period", 0.01, 86400, "seconds"),
    "default_users": Bound("default users", 0, 10_000, "IDs", int),
    "database_url": Bound("database URL", 1, 4096, "characters", int),
    "provider_url": Bound("provider URL", 1, 2048, "characters", int),
    "provider_token": Bound("provider token", 1, 16384, "characters", int),
    "key": Bound("--key", 1, 200, "characters", int),
}

# Plain ASCII decimals only: int() and float() also take "1_000", "٣" (Arabic-Indic
# digits), "inf" and "nan", none of which an operator means as a count or a duration.
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
# More digits than any bound has: out of bounds without converting (int() refuses more
# than 4300 digits with ValueError).
_MAX_DIGITS = 30


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def parse_bounded(text: str, origin: str, name: str) -> Any:
    """``text`` as the number ``BOUNDS[name]`` describes, or SettingError naming the
    setting, where it came from and its bounds."""
    bound = BOUNDS[name]
    value = text.strip()
    pattern = _INT if bound.kind is int else _FLOAT
    if not pattern.fullmatch(value):
        what = "a whole number" if bound.kind is int else "a number"
        raise SettingError(
            f"{origin}: {bound.label} {_shown(text)} is not {what} ({bound.describe()})"
        )
    if bound.kind is int and len(value.lstrip("+-").lstrip("0")) > _MAX_DIGITS:
        number: float = math.inf
    else:
        number = bound.kind(value)
    if not bound.low <= number <= bound.high:  # NaN cannot get here: the pattern refuses it
        raise SettingError(
            f"{origin}: {bound.label} {_shown(text)} is out of bounds ({bound.describe()})"
        )
    return number


def check_length(text: str, origin: str, name: str) -> str:
    bound = BOUNDS[name]
    if not bound.low <= len(text) <= bound.high:
        raise SettingError(
            f"{origin}: {bound.label} is {len(text)} characters long ({bound.describe()})"
        )
    return text


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` request starts in any rolling window of ``period`` seconds."""

    limit: int
    period: float

    def __str__(self) -> str:
        return f"{self.limit}/{self.period:g}"


@dataclass(frozen=True)
class Settings:
    database_url: str
    database_url_source: str
    rate_limit: RateLimit | None = RateLimit(50, 30.0)
    concurrency: int = 10
    # The most of the shared concurrency this process takes; None: all of it.
    worker_concurrency: int | None = None
    default_users: tuple[str, ...] = SEED_USER_IDS
    log_format: LogFormat | None = None  # None: JSON unless stderr is a terminal
    connect_timeout: float = 5.0
    max_batch: int = 1_000_000
    shutdown_grace: float = 10.0
    poll_interval: float = 0.1
    provider_url: str | None = None
    provider_token: str | None = field(default=None, repr=False)  # never shown or stored
    provider_timeout: float = 10.0
    provider_max_attempts: int = 5
    provider_deadline: float = 300.0
    metrics_file: Path | None = None  # Prometheus textfile, rewritten by runs and workers
    config_file: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def public_view(self) -> dict[str, Any]:
        """The resolved values as an operator may see them: passwords hidden."""
        from accessctl.db import hide_password
        from accessctl.redact import redact_url

        return {
            "database_url": hide_password(self.database_url),
            "rate_limit": str(self.rate_limit) if self.rate_limit else "none",
            "concurrency": self.concurrency,
            "worker_concurrency": self.worker_concurrency,
            "default_users": list(self.default_users),
            "log_format": self.log_format or "auto",
            "connect_timeout": self.connect_timeout,
            "max_batch": self.max_batch,
            "shutdown_grace": self.shutdown_grace,
            "poll_interval": self.poll_interval,
            "provider_url": redact_url(self.provider_url) if self.provider_url else None,
            "provider_token": "(set)" if self.provider_token else None,
            "provider_timeout": self.provider_timeout,
            "provider_max_attempts": self.provider_max_attempts,
            "provider_deadline": self.provider_deadline,
            "metrics_file": str(self.metrics_file) if self.metrics_file else None,
            "config_file": str(self.config_file) if self.config_file else None,
            "sources": dict(self.sources),
        }


def default_database_url(env: Mapping[str, str]) -> str:
    """The embedded default: a SQLite file at a stable per-user place, never the cwd."""
    data_home = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "share")
    path = Path(data_home).expanduser() / APP_NAME / f"{APP_NAME}.sqlite"
    return f"sqlite:///{path}"


def parse_rate_limit(text: str, origin: str) -> RateLimit | None:
    """``"50/30"`` is 50 starts per 30 s; ``"none"`` lifts the limit."""
    value = text.strip().lower()
    if value in ("none", "off", "unlimited"):
        return None
    limit_text, slash, period_text = value.partition("/")
    if (
        not slash
        or not _INT.fullmatch(limit_text.strip())
        or not _FLOAT.fullmatch(period_text.strip())
    ):
        raise SettingError(
            f"{origin}: rate limit {_shown(text)} is not LIMIT/SECONDS (e.g. 50/30) or none"
        )
    limit = parse_bounded(limit_text, origin, "rate_limit_limit")
    period = parse_bounded(period_text, origin, "rate_limit_period")
    return RateLimit(int(limit), float(period))


def parse_user_list(text: str, origin: str) -> tuple[str, ...]:
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    bound = BOUNDS["default_users"]
    if len(ids) > bound.high:
        raise SettingError(
            f"{origin}: {len(ids)} default users is out of bounds ({bound.describe()})"
        )
    for user_id in ids:
        try:
            uuid.UUID(user_id)
        except ValueError:
            raise SettingError(f"{origin}: {_shown(user_id)} is not a UUID") from None
    return ids


def _load_config_file(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Read dbos-config.yaml as the ``dbos`` CLI does, ``${VAR}`` substitution included."""
    import yaml

    from accessctl.files import CONFIG_FILE, read_bounded

    # Bounded (size, line length, regular files only): `--config /dev/zero` read forever.
    # Too large is a usage error (exit 2); missing, unreadable or not UTF-8 stays exit 3.
    text = read_bounded(str(path), "config file", CONFIG_FILE, error=ConfigError)
    text = re.sub(r"\$\{([^}]+)\}", lambda m: env.get(m.group(1), ""), text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    url = data.get("system_database_url")
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"{path}: key 'system_database_url' must be a string")
    extra = data.get("env")
    if extra is not None and (
        not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra)
    ):
        raise ConfigError(f"{path}: key 'env' must map variable names to values")
    return data


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve every setting. First match wins, in this order:

    1. command-line flags (``flags``: ``database_url``, ``rate_limit``, ``concurrency``,
       ``log_format``, ``config_file``);
    2. the environment: ``ACCESSCTL_*`` variables, then DBOS's ``DBOS_SYSTEM_DATABASE_URL``;
    3. ``dbos-config.yaml`` (``--config``, ``ACCESSCTL_CONFIG``, else ``./dbos-config.yaml``):
       ``system_database_url`` for the database, and its ``env:`` section for ``ACCESSCTL_*``
       keys -- the same file the ``dbos`` CLI reads, so ``dbos workflow list`` sees the same
       database;
    4. built-in defaults; the database defaults to an embedded SQLite file at
       ``$XDG_DATA_HOME/accessctl/accessctl.sqlite`` (``~/.local/share/...`` when unset).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd

    config_path: Path | None = None
    config_source = "default"
    if "config_file" in flags:
        config_path, config_source = Path(flags["config_file"]), "--config"
    elif env.get("ACCESSCTL_CONFIG"):
        config_path, config_source = Path(env["ACCESSCTL_CONFIG"]), "ACCESSCTL_CONFIG"
    elif (cwd / CONFIG_FILE_NAME).is_file():
        config_path, config_source = cwd / CONFIG_FILE_NAME, "working directory"
    file_data = _load_config_file(config_path, env) if config_path else {}
    file_env = {str(k): str(v) for k, v in (file_data.get("env") or {}).items() if v is not None}
    file_origin = str(config_path)

    sources: dict[str, str] = {"config_file": config_source}

    def lookup(flag: str, var: str) -> tuple[Any, str] | None:
        if flag in flags:
            return flags[flag], f"--{flag.replace('_', '-')}"
        if env.get(var, "").strip():
            return env[var], var
        if file_env.get(var, "").strip():
            return file_env[var], f"{file_origin} env.{var}"
        return None

    # The database URL: one URL serves the application tables and DBOS.
    url_found = lookup("database_url", "ACCESSCTL_DATABASE_URL")
    if url_found is None and env.get("DBOS_SYSTEM_DATABASE_URL", "").strip():
        url_found = (env["DBOS_SYSTEM_DATABASE_URL"], "DBOS_SYSTEM_DATABASE_URL")
    if url_found is None and (file_data.get("system_database_url") or "").strip():
        url_found = (file_data["system_database_url"], f"{file_origin} system_database_url")
    if url_found is None:
        url_found = (default_database_url(env), "default")
    database_url, sources["database_url"] = str(url_found[0]).strip(), url_found[1]

    values: dict[str, Any] = {}

    def bounded(name: str) -> Any:
        return lambda t, o: parse_bounded(t, o, name)

    parsers: dict[str, tuple[str, Any]] = {
        "rate_limit": ("ACCESSCTL_RATE_LIMIT", parse_rate_limit),
        "concurrency": ("ACCESSCTL_CONCURRENCY", bounded("concurrency")),
        "worker_concurrency": ("ACCESSCTL_WORKER_CONCURRENCY", bounded("worker_concurrency")),
        "default_users": ("ACCESSCTL_DEFAULT_USERS", parse_user_list),
        "log_format": ("ACCESSCTL_LOG_FORMAT", _parse_log_format),
        "connect_timeout": ("ACCESSCTL_CONNECT_TIMEOUT", bounded("connect_timeout")),
        "max_batch": ("ACCESSCTL_MAX_BATCH", bounded("max_batch")),
        "shutdown_grace": ("ACCESSCTL_SHUTDOWN_GRACE", bounded("shutdown_grace")),
        "poll_interval": ("ACCESSCTL_POLL_INTERVAL", bounded("poll_interval")),
        "provider_url": ("ACCESSCTL_PROVIDER_URL", _parse_provider_url),
        "provider_timeout": ("ACCESSCTL_PROVIDER_TIMEOUT", bounded("provider_timeout")),
        "provider_max_attempts": (
            "ACCESSCTL_PROVIDER_MAX_ATTEMPTS",
            bounded("provider_max_attempts"),
        ),
        "provider_deadline": ("ACCESSCTL_PROVIDER_DEADLINE", bounded("provider_deadline")),
        "metrics_file": ("ACCESSCTL_METRICS_FILE", lambda t, o: Path(t.strip()).expanduser()),
    }
    for name, (var, parse) in parsers.items():
        found = lookup(name, var)
        if found is None:
            sources[name] = "default"
            continue
        raw, origin = found
        values[name] = parse(str(raw), origin)
        sources[name] = origin

    token = lookup("provider_token", "ACCESSCTL_PROVIDER_TOKEN")
    token_file = lookup("provider_token_file", "ACCESSCTL_PROVIDER_TOKEN_FILE")
    if token is not None:
        values["provider_token"] = check_length(str(token[0]).strip(), token[1], "provider_token")
        sources["provider_token"] = token[1]
    elif token_file is not None:
        values["provider_token"] = _read_token_file(str(token_file[0]), token_file[1])
        sources["provider_token"] = token_file[1]

    from accessctl.db import validate_database_url

    if database_url:  # empty: validate_database_url says so in its own words
        check_length(database_url, sources["database_url"], "database_url")
    try:
        validate_database_url(database_url)
    except ConfigError as exc:
        # Name where the URL came from: a flag, a variable, or the config file's key. A
        # URL that cannot be used as written is a malformed value: exit 2, like any other.
        raise SettingError(f"{sources['database_url']}: {exc.message}") from None
    return Settings(
        database_url=database_url,
        database_url_source=sources["database_url"],
        config_file=config_path,
        sources=sources,
        **values,
    )


def _parse_log_format(text: str, origin: str) -> LogFormat:
    value = text.strip().lower()
    if value == "json":
        return "json"
    if value == "console":
        return "console"
    raise SettingError(f"{origin}: log format {_shown(text)} is not 'json' or 'console'")


def _parse_provider_url(text: str, origin: str) -> str:
    from urllib.parse import urlsplit

    value = check_length(text.strip(), origin, "provider_url")
    expected = f"{origin}: provider URL must be http(s)://HOST[:PORT]/PATH"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SettingError(f"{expected}; it contains control characters")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number, or > 65535
        hostname = parts.hostname
    except ValueError as exc:  # "http://[::1": urlsplit's "Invalid IPv6 URL", a bad port
        raise SettingError(f"{expected} ({exc})") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise SettingError(expected)
    return value


def _read_token_file(path: str, origin: str) -> str:
    from accessctl.files import TOKEN_FILE, read_bounded

    # Bounded like every file: a token file of /dev/zero read forever. A file that cannot
    # be read is configuration (exit 3); one whose content is no token is a bad value (2).
    label = f"{origin}: token file"
    token = read_bounded(
        path, label, TOKEN_FILE, error=ConfigError, decode_error=SettingError
    ).strip()
    if not token:
        raise SettingError(f"{label} {_shown(path)} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in token):
        # A bearer token is one line of visible characters; anything else would corrupt
        # the Authorization header (or is not the file the operator meant).
        raise SettingError(f"{label} {_shown(path)} holds control characters or several lines")
    return check_length(token, origin, "provider_token")

"""Exception types that carry their exit code, and the exit codes themselves.

Every failure an operator can cause or meet is one of these; the CLI turns them into a
one-line message on stderr and the matching exit code in one place.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The documented exit codes (README and ``accessctl --help`` list the same set)."""

    OK = 0  # every request recorded
    SOME_FAILED = 1  # some requests failed: rows in `errors`
    USAGE = 2  # bad arguments, input or setting value (malformed, out of bounds); nothing filed
    CONFIG = 3  # config/token file unreadable, database unreachable or damaged, internal error
    NOT_MIGRATED = 4  # schema missing or outdated: run `accessctl migrate`
    INTERRUPTED = 130  # SIGINT: in-flight work finished, the rest resumes later
    TERMINATED = 143  # SIGTERM: likewise


class AccessctlError(Exception):
    """Base class: a message for the operator and the exit code that goes with it."""

    exit_code: ExitCode = ExitCode.CONFIG

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(AccessctlError):
    """Bad arguments or input: refused before anything is filed."""

    exit_code = ExitCode.USAGE


class SettingError(UsageError):
    """A setting's value (flag, environment or config file ``env:``) is malformed or outside
    its documented bounds: the operator typed it, so it is a usage error (exit 2)."""


class ConfigError(AccessctlError):
    """Configuration that cannot be used: a config or token file that cannot be read, a
    config file that is not valid YAML or has the wrong shape, a SQLite path that cannot hold
    a database. (A malformed or out-of-bounds *value* is a ``SettingError``, exit 2.)"""

    exit_code = ExitCode.CONFIG


class DatabaseUnreachable(AccessctlError):
    """The database refused us, timed out, or does not exist."""

    exit_code = ExitCode.CONFIG


class SchemaNotMigrated(AccessctlError):
    """The database schema is missing or older than this release expects."""

    exit_code = ExitCode.NOT_MIGRATED


class Interrupted(AccessctlError):
    """A signal stopped the run; the work goes on with the next run or a worker."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code

"""Reading and validating what operators feed the tool, before anything is filed."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from accessctl.errors import UsageError

MAX_LISTED = 10  # invalid entries named in the one-line error before "and N more"


@dataclass(frozen=True)
class InvalidInput:
    line: int
    text: str
    reason: str
    where: str = "line"  # "argument", "line" (of --file) or "stdin line"

    def as_dict(self) -> dict[str, object]:
        return {"line": self.line, "text": self.text, "reason": self.reason}


@dataclass
class UserIdInput:
    user_ids: list[str] = field(default_factory=list)
    invalid: list[InvalidInput] = field(default_factory=list)


def normalize_user_id(text: str) -> str:
    """The canonical form of a user ID, or ValueError."""
    if "\x00" in text:
        raise ValueError("contains a NUL byte")
    if len(text) > 64:
        raise ValueError("is too long to be a UUID")
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ValueError("is not a UUID") from None


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def storable(text: str) -> str:
    """``text`` as it may be stored and shown: no NUL (JSONB refuses ``\\u0000``) and no
    lone surrogates (undecodable bytes from argv or a file; UTF-8 cannot encode them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            # Undecodable bytes from argv (surrogateescape): show them as \\xNN.
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\0")


def parse_user_ids(
    entries: Iterable[tuple[int, str]], where: str = "line", into: UserIdInput | None = None
) -> UserIdInput:
    """Validate ``(line, text)`` entries; blank lines and ``#`` comments are skipped."""
    result = UserIdInput() if into is None else into
    for line, raw in entries:
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            result.user_ids.append(normalize_user_id(text))
        except ValueError as exc:
            result.invalid.append(InvalidInput(line, storable(text), str(exc), where))
    return result


def read_lines(source: str, stdin: TextIO, label: str = "--file") -> list[tuple[int, str]]:
    """Numbered lines of ``--file PATH`` or ``-`` (stdin); ``label`` names it in errors."""
    if source == "-":
        try:
            text = stdin.read()
        except UnicodeDecodeError:
            raise UsageError("stdin is not UTF-8 text") from None
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except ValueError as exc:  # an embedded NUL byte in the path
            if isinstance(exc, UnicodeDecodeError):
                raise UsageError(f"{label} {_shown(source)}: is not UTF-8 text") from None
            raise UsageError(f"{label} {_shown(source)}: not a valid path ({exc})") from None
        except FileNotFoundError:
            raise UsageError(f"{label} {source}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"{label} {source}: is a directory") from None
        except OSError as exc:
            raise UsageError(f"{label} {source}: cannot read ({exc.strerror})") from None
    return list(enumerate(text.splitlines(), start=1))


def collect_user_ids(
    args: list[str], file: str | None, stdin: TextIO, *, skip_invalid: bool
) -> UserIdInput:
    """User IDs from arguments (``-`` reads stdin) and ``--file``. Every malformed one is
    reported at once; with ``skip_invalid`` they are returned for recording instead."""
    parsed = UserIdInput()
    for position, arg in enumerate(args, start=1):
        if arg == "-":
            where = "line" if file == "-" else "stdin line"
            parse_user_ids(read_lines("-", stdin), where, into=parsed)
        else:
            parse_user_ids([(position, arg)], "argument", into=parsed)
    if file is not None:
        parse_user_ids(read_lines(file, stdin), "line", into=parsed)
    if parsed.invalid and not skip_invalid:
        listed = "; ".join(
            f"{item.where} {item.line}: {_shown(item.text)} {item.reason}"
            for item in parsed.invalid[:MAX_LISTED]
        )
        more = len(parsed.invalid) - MAX_LISTED
        suffix = f"; and {more} more" if more > 0 else ""
        raise UsageError(
            f"{len(parsed.invalid)} malformed user ID(s), nothing filed: {listed}{suffix} "
            "(use --skip-invalid to file the valid ones and record the rest as errors)"
        )
    return parsed


def parse_count(text: str, maximum: int) -> int:
    """``batch N``: a whole number from 1 to ``maximum``."""
    stripped = text.strip()
    if stripped.startswith("-") and stripped[1:].isdigit() and stripped[1:].isascii():
        raise UsageError(f"N must be from 1 to {maximum} (ACCESSCTL_MAX_BATCH), got {stripped}")
    if not stripped.isdigit() or not stripped.isascii():
        raise UsageError(f"N must be a whole number from 1 to {maximum}, got {_shown(text)}")
    value = int(stripped)
    if not 1 <= value <= maximum:
        raise UsageError(f"N must be from 1 to {maximum} (ACCESSCTL_MAX_BATCH), got {value}")
    return value


def parse_key(key: str | None) -> str | None:
    """An idempotency key names a batch: 1-200 printable characters."""
    if key is None:
        return None
    if not key.strip():
        raise UsageError("--key must not be empty or blank")
    if len(key) > 200:
        raise UsageError(f"--key is {len(key)} characters long; the maximum is 200")
    if not key.isprintable():
        raise UsageError("--key must contain printable characters only")
    return key

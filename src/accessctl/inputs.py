"""Reading and validating what operators feed the tool, before anything is filed."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO, cast

from accessctl.exceptions import UsageError
from accessctl.files import ID_FILE, FileBounds, read_bounded

MAX_LISTED = 10  # invalid entries named in the one-line error before "and N more"


@dataclass(frozen=True)
class InvalidInput:
    line: int
    text: str
    reason: str
    where: str = "line"  # "argument", "line" (of --file) or "stdin line"


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


def stdin_bytes(stdin: TextIO) -> BinaryIO:
    """The byte stream under ``stdin``: read in bounded chunks, decoded once (strictly)."""
    if stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("stdin: is closed; nothing to read for '-'")
    buffer = getattr(stdin, "buffer", None)
    if buffer is not None:
        return cast(BinaryIO, buffer)
    # A text-only stream (a test's StringIO): its characters, re-encoded, chunk by chunk.
    return cast(BinaryIO, _EncodedText(stdin))


class _EncodedText:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def read(self, size: int) -> bytes:
        return self._stream.read(size).encode("utf-8", "surrogateescape")


def read_lines(
    source: str, stdin: TextIO, label: str = "--file", bounds: FileBounds = ID_FILE
) -> list[tuple[int, str]]:
    """Numbered lines of ``--file PATH`` or ``-`` (stdin); ``label`` names it in errors.
    The read is bounded (``accessctl.files``): size, line length, regular files only."""
    if source == "-":
        text = read_bounded("-", "stdin", bounds, stdin=stdin_bytes(stdin))
    else:
        text = read_bounded(source, label, bounds)
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
    digits = stripped[1:] if stripped.startswith("-") else stripped
    if not digits.isdigit() or not digits.isascii():
        raise UsageError(f"N must be a whole number from 1 to {maximum}, got {_shown(text)}")
    if len(digits.lstrip("0")) > len(str(maximum)):
        # Out of bounds whatever it is; and int() refuses more than 4300 digits.
        raise UsageError(
            f"N must be from 1 to {maximum} (ACCESSCTL_MAX_BATCH), got {stripped[:12]}... "
            f"({len(digits)} digits)"
        )
    value = int(stripped)
    if not 1 <= value <= maximum:
        raise UsageError(f"N must be from 1 to {maximum} (ACCESSCTL_MAX_BATCH), got {value}")
    return value


def parse_key(key: str | None) -> str | None:
    """An idempotency key names a batch: 1-200 printable characters (settings.BOUNDS)."""
    from accessctl.settings import BOUNDS

    if key is None:
        return None
    if not key.strip():
        raise UsageError("--key must not be empty or blank")
    longest = int(BOUNDS["key"].high)
    if len(key) > longest:
        raise UsageError(f"--key is {len(key)} characters long; the maximum is {longest}")
    if not key.isprintable():
        raise UsageError("--key must contain printable characters only")
    return key

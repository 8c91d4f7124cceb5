"""Bounded reads of every file an operator hands us: the one way the program reads one.

Why bounded: ``--file /dev/zero``, a token file of ``/dev/zero`` or a FIFO nobody writes to
used to read forever (or until MemoryError). Every read here stops at a size and a line
length, refuses what is not a regular file (a FIFO or a device could block or never end;
stdin ``-`` may be a pipe and is bounded the same way), strips a UTF-8 byte-order mark
(editors on Windows write one, and it would make the first ID or CSV header invalid),
and decodes UTF-8 strictly.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from accessctl.exceptions import AccessctlError, UsageError

KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB
BOM = "\ufeff"


@dataclass(frozen=True)
class FileBounds:
    """At most ``max_bytes`` in all and ``max_line`` bytes between two line breaks."""

    what: str  # how the README names it
    max_bytes: int
    max_line: int


# The documented bounds (README "Configuration" and "Commands"). An ID line is a UUID (36
# characters) or a comment; 256 MiB holds about 7 million UUID lines, more than the default
# largest batch (1,000,000) needs. A users file row is at most ~600 bytes of valid data.
ID_FILE = FileBounds("user ID input (--file, stdin)", 256 * MIB, 64 * KIB)
USERS_FILE = FileBounds("users import file", 64 * MIB, 64 * KIB)
CONFIG_FILE = FileBounds("config file", 1 * MIB, 64 * KIB)
TOKEN_FILE = FileBounds("token file", 64 * KIB, 64 * KIB)


def _shown(text: str) -> str:
    # repr: a path may hold control characters; cut: it may be any length.
    return repr(text if len(text) <= 200 else text[:200] + "...")


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n // KIB} KiB"


def read_bounded(
    source: str,
    label: str,
    bounds: FileBounds,
    *,
    stdin: BinaryIO | None = None,
    error: type[AccessctlError] = UsageError,
    decode_error: type[AccessctlError] | None = None,
) -> str:
    """The text of ``source`` (a path, or ``-`` for ``stdin``), BOM stripped.

    Too large, a line too long, or not a regular file: ``UsageError`` (exit 2), since the
    bound is part of the documented interface. Missing, unreadable or not UTF-8: ``error``
    (the caller decides: input files are usage errors, a config or token file that cannot
    be read is a configuration error); not UTF-8: ``decode_error``, else ``error``."""
    if source == "-":
        if stdin is None:
            raise UsageError(f"{label}: '-' (stdin) is not accepted here")
        data = _read_chunks(stdin, label, bounds)
        name = label
    else:
        name = f"{label} {_shown(source)}"
        data = _read_path(source, name, bounds, error)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise (decode_error or error)(f"{name}: is not UTF-8 text") from None
    return text[1:] if text.startswith(BOM) else text


def _read_path(source: str, name: str, bounds: FileBounds, error: type[AccessctlError]) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever.
        fd = os.open(os.path.expanduser(source), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError as exc:  # an embedded NUL byte in the path
        raise error(f"{name}: not a valid path ({exc})") from None
    except FileNotFoundError:
        raise error(f"{name}: cannot read (no such file)") from None
    except OSError as exc:
        raise error(f"{name}: cannot read ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{name}: is a directory")
        if not stat.S_ISREG(mode):
            # A device (/dev/zero) never ends; a FIFO may never be written. stdin ('-')
            # is the one stream we read, and it is bounded too.
            raise UsageError(f"{name}: is not a regular file (to read a pipe, give '-' for stdin)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return _read_chunks(stream, name, bounds)
    except OSError as exc:
        raise error(f"{name}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)


def _read_chunks(stream: BinaryIO, name: str, bounds: FileBounds) -> bytes:
    """Read in chunks, never more than the bounds allow (plus one chunk)."""
    parts: list[bytes] = []
    total = 0
    line = 0  # bytes since the last line break
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > bounds.max_bytes:
            raise UsageError(
                f"{name}: is larger than {_size(bounds.max_bytes)}, the limit for a {bounds.what}"
            )
        segments = chunk.split(b"\n")
        line += len(segments[0])  # the first segment continues the current line
        if max([line, *map(len, segments[1:])]) > bounds.max_line:
            raise UsageError(
                f"{name}: has a line longer than {_size(bounds.max_line)}, "
                f"the limit for a {bounds.what}"
            )
        if len(segments) > 1:
            line = len(segments[-1])
        parts.append(chunk)
    return b"".join(parts)

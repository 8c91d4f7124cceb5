"""ID prefixes, without a database: what counts as a prefix and what is refused."""

from __future__ import annotations

import pytest

from accessctl.exceptions import UsageError
from accessctl.idprefix import MIN_PREFIX, hex_prefix

WHOLE = "a07ff062-58d1-4f9c-8e2b-6c1d0e9a7b31"


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        (WHOLE, None),  # a whole UUID needs no lookup
        (WHOLE.upper(), None),
        ("a07f", "a07f"),
        ("A07FF062", "a07ff062"),
        ("a07ff062-58", "a07ff06258"),
        ("a07ff062-58d1-4f9c", "a07ff06258d14f9c"),
        ("  a07ff062 ", "a07ff062"),
        (WHOLE.replace("-", "")[:31], WHOLE.replace("-", "")[:31]),
    ],
)
def test_prefixes(text: str, digits: str | None) -> None:
    assert hex_prefix(text, "batch ID") == digits


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a07", f"at least {MIN_PREFIX} hex digits"),
        ("", "is not a UUID or a prefix of one"),
        ("xyz1", "is not a UUID or a prefix of one"),
        ("a07f-f062", "is not a UUID or a prefix of one"),  # a dash where none belongs
        ("a07ff062%", "is not a UUID or a prefix of one"),  # no LIKE wildcards
        ("a07ff062_", "is not a UUID or a prefix of one"),
        (WHOLE.replace("-", "") + "0", "is not a UUID or a prefix of one"),
        ("a\x00b0", "is not a UUID or a prefix of one"),
    ],
)
def test_what_is_refused(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as refused:
        hex_prefix(text, "batch ID")
    assert needle in refused.value.message
    assert refused.value.message.startswith("batch ID ")

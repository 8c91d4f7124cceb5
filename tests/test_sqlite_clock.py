"""The SQLite clock DBOS's limiter reads: millisecond precision on every Python, and a
``unixepoch('subsec')`` that SQLite before 3.42 lacks (DBOS uses it on Python 3.12+)."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from accessctl.db import make_engine


def test_sqlite_clock_has_millisecond_precision(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'clock.sqlite'}")
    samples = []
    with engine.connect() as conn:
        for _ in range(20):
            # DBOS's two spellings of "now in ms" (Python < 3.12 and >= 3.12).
            legacy = conn.execute(
                sa.text("SELECT CAST(strftime('%s','now') * 1000 AS BIGINT)")
            ).scalar()
            subsec = conn.execute(
                sa.text("SELECT CAST(unixepoch('subsec') * 1000 AS BIGINT)")
            ).scalar()
            now = time.time() * 1000
            assert legacy is not None and subsec is not None
            assert abs(legacy - now) < 1000 and abs(subsec - now) < 1000
            samples.append(legacy)
            time.sleep(0.003)
    # Whole seconds would make every sample a multiple of 1000.
    assert any(s % 1000 for s in samples)
    assert len(set(samples)) > 10
    engine.dispose()


def test_sqlite_builtins_keep_their_other_meanings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'clock.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT strftime('%Y', '2024-05-06')")).scalar() == "2024"
        assert conn.execute(sa.text("SELECT unixepoch('1970-01-02')")).scalar() == 86400
    engine.dispose()

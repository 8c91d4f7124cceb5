"""Alembic environment: the URL comes from accessctl's settings, the metadata from its models.

`accessctl migrate` passes an open connection (holding the migration lock) in
``config.attributes["connection"]``; plain ``alembic`` use falls back to the resolved URL.
"""

from __future__ import annotations

from alembic import context

from accessctl.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from accessctl.db import make_engine
        from accessctl.settings import resolve_settings

        engine = make_engine(resolve_settings().database_url)
        with engine.begin() as conn:
            _run(conn)
        engine.dispose()
    else:
        _run(connection)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()

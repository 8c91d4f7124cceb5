"""What reaches the operator's stderr from DBOS's own records."""

from __future__ import annotations

import io
import logging

from accessctl.logs import configure_logging


def test_dbos_tracebacks_are_cut_to_their_exception_line() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    dbos = logging.getLogger("dbos")
    try:
        raise ConnectionError("server closed the connection unexpectedly")
    except ConnectionError:
        import traceback

        dbos.warning(f"Exception polling schedules: {traceback.format_exc()}")
        dbos.error("Exception encountered when recovering workflow w1:", exc_info=True)
    logging.getLogger("accessctl.test").info("ours %s", "untouched")
    out = stream.getvalue()
    assert "Traceback" not in out and 'File \\"' not in out, out
    assert "Exception polling schedules: ConnectionError: server closed" in out
    assert "recovering workflow w1: (ConnectionError: server closed" in out
    assert "ours untouched" in out

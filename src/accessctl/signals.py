"""The signal policy while a batch runs attached or a worker drains the queue.

The first SIGINT/SIGTERM stops waiting and lets in-flight requests finish; the second exits
at once (nothing is lost: the batch is durable). Outside these windows ``entry.py``'s
start-up handlers apply: a signal ends the process with one line and its documented code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from accessctl.exceptions import ExitCode


@contextmanager
def graceful_signals() -> Iterator[tuple[threading.Event, Callable[[], ExitCode]]]:
    """First SIGINT/SIGTERM: stop waiting, let in-flight requests finish. Second: exit now
    (nothing is lost: the batch is durable).

    Yields the event the first signal sets and a function giving the exit code it calls
    for (130 for SIGINT, 143 for SIGTERM); the previous handlers are restored on exit."""
    stop = threading.Event()
    received: list[int] = []

    def code() -> ExitCode:
        return (
            ExitCode.TERMINATED
            if received and received[0] == signal.SIGTERM
            else (ExitCode.INTERRUPTED)
        )

    def handler(signum: int, _frame: Any) -> None:
        if received:
            sys.stderr.write("accessctl: error: second signal, exiting now\n")
            os._exit(int(ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED))
        received.append(signum)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop, code
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

"""The ``accessctl`` entry point: signal handlers first, then everything else.

Why first: the CLI's imports (typer, click, rich; DBOS and SQLAlchemy later) take a
noticeable time, and until a handler of ours is in place Python's own SIGINT handler raises
``KeyboardInterrupt`` wherever the main thread is (a traceback out of an import), while
SIGTERM's default action ends the process without a word. So this module imports nothing
but builtins, and ``main`` installs handlers that print one line and exit with the
documented code (130 for SIGINT, 143 for SIGTERM) before importing the CLI.

The hand-over: ``signals.graceful_signals`` replaces these handlers while a batch runs
attached or a worker runs (there the first signal stops taking work and lets in-flight
requests finish), and restores them when it ends. Everywhere else (start-up, configuration, connecting,
filing a detached batch, read-only commands) a signal simply ends the process: whatever it
interrupts is one database transaction, which the database rolls back, so nothing is
half-filed.
"""

# Only builtins and modules the interpreter has loaded already: no ``from __future__``,
# no ``typing`` (~3 ms of imports, during which SIGINT would still be a traceback).
import os

# The builtin behind ``signal``: ``import signal`` costs ~4 ms (it imports enum) before
# the first handler could be set; this costs nothing. Same functions, plain int numbers.
_signal = __import__("_signal")

SIGINT: int = _signal.SIGINT
SIGTERM: int = _signal.SIGTERM
_MESSAGES = {
    SIGINT: b"accessctl: error: interrupted by SIGINT\n",
    SIGTERM: b"accessctl: error: interrupted by SIGTERM\n",
}


def exit_code_for(signum: int) -> int:
    """The documented code: 130 for SIGINT, 143 for SIGTERM (128 + the signal number)."""
    return 143 if signum == SIGTERM else 130


def _exit_now(signum: int, _frame: object) -> None:
    # os.write and os._exit: no buffered stream to flush or lock to take inside a handler.
    os.write(2, _MESSAGES.get(signum, _MESSAGES[SIGINT]))
    os._exit(exit_code_for(signum))


def install_early_handlers() -> None:
    """SIGINT and SIGTERM end the process with one line and the documented code."""
    for signum in (SIGINT, SIGTERM):
        _signal.signal(signum, _exit_now)


def main() -> None:
    install_early_handlers()
    from accessctl.cli import main as cli_main

    cli_main()

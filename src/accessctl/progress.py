"""Showing a running batch: a rich progress bar on a terminal, log lines otherwise.

Both go to stderr; stdout stays for the summary. The ETA knows the rate limit: a backlog
cannot finish faster than L requests per P seconds, whatever the early pace suggests.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import Any

import structlog

from accessctl.settings import RateLimit

log = structlog.get_logger(__name__)


def eta_seconds(
    remaining: int, elapsed: float, done: int, rate_limit: RateLimit | None
) -> float | None:
    """Seconds left: the slower of the observed pace and the rate limit's bound."""
    if remaining <= 0:
        return 0.0
    estimates = []
    if rate_limit is not None:
        estimates.append(remaining * rate_limit.period / rate_limit.limit)
    if done > 0 and elapsed > 0:
        estimates.append(remaining * elapsed / done)
    return max(estimates) if estimates else None


class ProgressReporter:
    """Call ``update(progress)`` with the batch's counts as it runs; use as a context manager."""

    def __init__(self, rate_limit: RateLimit | None, *, interactive: bool | None = None) -> None:
        self.rate_limit = rate_limit
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.started = time.monotonic()
        self.last_log = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]filing[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
        return self

    def update(self, progress: dict[str, Any]) -> None:
        total, done = int(progress.get("total", 0)), int(progress.get("done", 0))
        elapsed = time.monotonic() - self.started
        eta = eta_seconds(total - done, elapsed, done, self.rate_limit)
        eta_text = "?" if eta is None else f"{math.ceil(eta)}s"
        if self._bar is not None:
            detail = f"failed {progress.get('failed', 0)}  ETA {eta_text}"
            if self._task is None:
                self._task = self._bar.add_task("batch", total=total, detail=detail)
            self._bar.update(self._task, completed=done, total=total, detail=detail)
            return
        now = time.monotonic()
        if now - self.last_log >= 2.0 or done >= total:
            self.last_log = now
            log.info(
                "batch progress",
                batch_id=progress.get("batch_id"),
                done=done,
                total=total,
                recorded=progress.get("recorded"),
                failed=progress.get("failed"),
                eta_seconds=None if eta is None else round(eta, 1),
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

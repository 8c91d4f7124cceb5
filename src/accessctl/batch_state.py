"""A batch's state: the one definition that ``status``, ``batches``, ``cancel`` and the exit
code of an attached run share.

    queued       filed; nobody has started on it yet (a detached batch before any worker)
    running      a live process follows it and its requests are being worked
    interrupted  the process running it died (its follower, or requests it had started
                 with no executor left alive); the next run or any worker resumes it
    cancelling   `accessctl cancel` stopped it; requests already in flight are finishing
    done         every request has its row (recorded or failed): nothing more will happen
    cancelled    stopped by `accessctl cancel`; every request has its row (the ones that
                 never started are recorded as Cancelled, so `retry` can file them again)
    failed       its follower workflow ended without every request having a row and
                 nothing is left running (e.g. cancelled from outside accessctl)

A batch that ended keeps its outcome in its ``batches`` row (``recorded``, ``failed``,
``state``), so pruning its workflow records or error rows never changes its report.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from dbos import WorkflowStatusString as Status

from accessctl.exceptions import ExitCode


class BatchState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    CANCELLING = "cancelling"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


FINAL = frozenset({BatchState.DONE, BatchState.CANCELLED, BatchState.FAILED})
# The states an attached run may end in and still exit 0 (when no request failed).
CLEAN = frozenset({BatchState.DONE, BatchState.CANCELLED})
STATES_HELP = (
    "States: queued (filed, not yet started), running, interrupted (its process died; "
    "the next run or any worker resumes it), cancelling, done, cancelled, failed (its "
    "follower ended with requests missing and nothing left running)."
)

# DBOS workflow statuses of a workflow that will not run again, and of one still to run.
WORKFLOW_ENDED = frozenset(
    s.value
    for s in (Status.SUCCESS, Status.ERROR, Status.CANCELLED, Status.MAX_RECOVERY_ATTEMPTS_EXCEEDED)
)
WORKFLOW_WAITING = frozenset(s.value for s in (Status.ENQUEUED, Status.DELAYED))
WORKFLOW_IN_FLIGHT = WORKFLOW_WAITING | {Status.PENDING.value}


def batch_state(
    *,
    stored: str | None,
    complete: bool,
    cancelled: bool,
    follower_status: str | None,
    follower_alive: bool | None,
    requests_in_flight: bool,
    started: bool = False,
    anyone_executing: bool | None = None,
) -> BatchState:
    """The state of one batch.

    ``stored``: the final state written when it ended (None while it runs);
    ``complete``: every request has its row; ``cancelled``: `accessctl cancel` ran;
    ``follower_status``: its ``run_batch`` workflow's DBOS status (None once pruned);
    ``follower_alive``: whether the executor running that workflow holds its lease;
    ``requests_in_flight``: any of its request workflows queued, delayed or running;
    ``started``: any of its requests has its row (its requests can start before the
    follower is claimed: then it is running, not queued); ``anyone_executing``: whether
    any executing process holds its lease (None: not known). A batch started but not yet
    followed, with no executor alive, was left by a run that died before its follower
    was claimed: interrupted, not running."""
    if stored is not None:
        return BatchState(stored)
    if complete:
        return BatchState.CANCELLED if cancelled else BatchState.DONE
    if cancelled:
        return BatchState.CANCELLING
    if follower_status in WORKFLOW_WAITING:
        if not started:
            return BatchState.QUEUED
        return BatchState.INTERRUPTED if anyone_executing is False else BatchState.RUNNING
    if follower_status == Status.PENDING.value:
        return BatchState.RUNNING if follower_alive else BatchState.INTERRUPTED
    if follower_status is None or follower_status in WORKFLOW_ENDED:
        # Nobody follows it any more; its requests may still be finishing on their own.
        return BatchState.RUNNING if requests_in_flight else BatchState.FAILED
    return BatchState.RUNNING


def exit_code_for(summary: Mapping[str, Any]) -> ExitCode:
    """The exit code of an attached run, and of its metrics: 0 only if no request failed
    and the batch ended done or cancelled; else 1."""
    if summary["failed"] or summary.get("state") not in CLEAN:
        return ExitCode.SOME_FAILED
    return ExitCode.OK

"""Target 5 -- start-up and reading.

* ``accessctl --help`` against ``python -c "import typer, rich"`` (same interpreter), with and
  without a bytecode cache;
* ``accessctl errors --limit 50`` on a database holding 1,000,000 error rows (``--quick``:
  200,000);
* ``accessctl submit`` of the four seed IDs on a fresh, then an existing, embedded database.

Commands are timed side by side: warm-up runs, then all of them in turn, run after run.

    uv run --group bench python bench/run_all.py --only startup [--quick]
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from common import (
    ACCESSCTL,
    LOG_DIR,
    PYTHON,
    SEED_USER_IDS,
    Backend,
    backend,
    backends,
    base_env,
    log,
    median,
)

BATCH = "00000000-0000-4000-8000-000000000007"  # one of fill_errors' 100 batches


def time_commands(
    commands: dict[str, list[str]],
    env: dict[str, str],
    runs: int,
    *,
    prepare: Callable[[], object] | None = None,
    warmup: int = 2,
) -> dict[str, dict[str, Any]]:
    """Median and min seconds per command, the commands interleaved run after run."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, command in commands.items():
            if prepare:
                prepare()
            t0 = time.perf_counter()
            subprocess.run(command, env=env, capture_output=True, check=False)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": round(median(ts), 4), "min_s": round(min(ts), 4), "runs": len(ts)}
        for name, ts in times.items()
    }


def py(code: str) -> list[str]:
    return [PYTHON, "-c", code]


def help_vs_imports(runs: int) -> dict[str, Any]:
    env = base_env()
    help_, typer = "accessctl --help", "python -c 'import typer, rich'"
    warm = {help_: [ACCESSCTL, "--help"], typer: py("import typer, rich")}
    timed = time_commands(
        {**warm, "python -c 'import dbos' (context)": py("import dbos")}, env, runs, warmup=3
    )
    # No bytecode cache (as this sandbox's shell has it): every module compiled at every
    # start. A cache prefix with nothing in it makes Python ignore the __pycache__ folders.
    cold_env = {
        **env,
        "PYTHONPYCACHEPREFIX": str(LOG_DIR / "empty"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cold = time_commands({f"{k} (no bytecode cache)": v for k, v in warm.items()}, cold_env, runs)
    ratio = timed[help_]["median_s"] / timed[typer]["median_s"]
    log(f"startup: --help / import typer,rich = {ratio:.2f}")
    return {"times": {**timed, **cold}, "ratio": round(ratio, 2)}


def fill_errors(b: Backend, n: int) -> float:
    """``n`` errors rows over 100 batches, one per second of age, written through the model's
    table (so in each backend's own storage format), then analysed. Seconds taken."""
    from accessctl.models import Error
    from accessctl.workflows import error_message

    now, t0, engine = datetime.now(UTC), time.monotonic(), b.engine()

    def row(g: int) -> dict[str, Any]:
        batch, request = uuid.UUID(f"00000000-0000-4000-8000-{g % 100:012d}"), f"bench-{g}"
        user, why = SEED_USER_IDS[1], "no such user"
        message = error_message(
            batch_id=str(batch),
            request_id=request,
            user_id=user,
            error_class="UnknownUser",
            detail=why,
        )
        return {
            "id": uuid.uuid4(),
            "message": message,
            "batch_id": batch,
            "request_id": request,
            "created_at": now - timedelta(seconds=g),
        }

    with engine.begin() as conn:
        for start in range(1, n + 1, 10_000):
            conn.execute(
                sa.insert(Error), [row(g) for g in range(start, min(n + 1, start + 10_000))]
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE errors" if b.kind == "postgres" else "ANALYZE"))
    engine.dispose()
    return round(time.monotonic() - t0, 1)


def errors_on_million(kind: str, rows: int, runs: int) -> dict[str, Any]:
    with backend(kind, f"err{kind[:2]}", users=False) as b:
        fill_s = fill_errors(b, rows)
        count = int(b.scalar("SELECT count(*) FROM errors"))
        errors = [ACCESSCTL, "errors", "--limit", "50"]
        commands = {
            "errors --limit 50": errors,
            "errors --limit 50 --json": [*errors, "--json"],
            "errors --batch B --limit 50": [*errors, "--batch", BATCH],
            "accessctl --help (same session)": [ACCESSCTL, "--help"],
        }
        timed = time_commands(commands, {**b.env, "COLUMNS": "200"}, runs)
    log(f"errors on {count} rows ({kind}): {timed['errors --limit 50']['median_s']:.3f}s median")
    return {"backend": kind, "rows": count, "fill_s": fill_s, "times": timed}


def submit_fresh(runs: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="accessctl-bench-submit-"))
    env, submit = base_env(XDG_DATA_HOME=str(home)), [ACCESSCTL, "submit", *SEED_USER_IDS]
    try:
        fresh = time_commands(
            {"submit 4 IDs, fresh embedded database": submit},
            env,
            runs,
            prepare=lambda: shutil.rmtree(home / "accessctl", ignore_errors=True),
        )
        warm = time_commands(
            {"submit 4 IDs, existing embedded database": submit}, env, runs, warmup=1
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"times": {**fresh, **warm}}


def run(quick: bool = False) -> dict[str, Any]:
    runs, rows = (5, 200_000) if quick else (10, 1_000_000)
    return {
        "help": help_vs_imports(runs),
        "errors": [errors_on_million(kind, rows, runs) for kind in backends()],
        "submit": submit_fresh(3 if quick else 5),
    }

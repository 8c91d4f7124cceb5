"""A throwaway PostgreSQL cluster of our own, for tests that restart the server.

The shared test server (ACCESSCTL_TEST_POSTGRES_URL) is never restarted: other test runs
use it. This starts PostgreSQL 15 from its binaries in a temporary directory, on a free
port of its own, with trust authentication, and removes it all afterwards. initdb refuses
to run as root, so as root it runs as the ``postgres`` OS user."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BINDIR = Path(os.environ.get("ACCESSCTL_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
FIRST_PORT = 55432
# Each pytest-xdist worker ("gw0", "gw1", ...) looks in a range of its own: two workers
# starting a cluster at once would otherwise both find the same port free.
PORTS_PER_WORKER = 200


def available() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (BINDIR / tool).exists():
            return f"{BINDIR / tool} not found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres OS user to run initdb as"
    return None


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = FIRST_PORT + PORTS_PER_WORKER * (int(worker) if worker.isdigit() else 0)
    for port in range(first, first + PORTS_PER_WORKER):
        if Path(f"/tmp/.s.PGSQL.{port}").exists():
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for a throwaway PostgreSQL cluster")


class Cluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="accessctl-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        try:
            self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
            self.ctl("start")
        except BaseException:
            self.remove()
            raise

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        command = [str(BINDIR / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def ctl(self, action: str, *extra: str) -> None:
        """``pg_ctl start|restart|stop``, waiting until it is done."""
        options = f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            "pg_ctl", action, "-D", str(self.data), "-o", options, "-l", str(self.logfile),
            "-w", "-t", "60", *extra,
        )  # fmt: skip

    def restart(self) -> None:
        """What an operator's ``pg_ctl restart -m fast`` does: every session is ended."""
        self.ctl("restart", "-m", "fast")

    def remove(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

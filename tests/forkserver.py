"""A fork server for the ``accessctl`` processes the tests start.

Most of an ``accessctl`` process's start-up is importing DBOS, SQLAlchemy and psycopg:
about 0.3 s of CPU of the 0.4 s a short command costs, and the suite starts some 230 of
them on two cores. This server imports those modules once, then forks a child per
command: each child is a real process of its own (its own PID, environment, working
directory, standard streams and signal handlers) running the installed entry point,
``accessctl.entry.main``, exactly as the ``accessctl`` script does. A test kills,
signals and waits for it as for any child (``ForkedPopen`` is a ``subprocess.Popen``).

What a forked child does not share with an executed one: the interpreter's start-up
itself. Tests whose subject is that (a signal during the imports, start-up cost) start
the installed script instead (``Cli.popen(..., new_interpreter=True)``).

Every accessctl module and the libraries its commands import are loaded before the fork
(``PRELOAD`` below): none of them reads the environment, the clock or the working directory
at import, so a child starts from the state a fresh process would reach. The server runs
no thread, so forking it is safe.

Under coverage (CI), ``[tool.coverage.run] patch = ["fork"]`` restarts measurement in each
child, which saves its own data file before it exits (``cli._save_coverage``).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# Every accessctl module, and what the commands import lazily (listed from sys.modules at
# a forked command's exit): DBOS's system database for each backend, and Typer's parameter
# coercion, which brings pydantic (70 ms). A child imports anything else itself.
PRELOAD_PACKAGE = "accessctl"
PRELOAD = (
    "dbos._sys_db_sqlite",
    "dbos._sys_db_postgres",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.sqlite",
    "psycopg",
    "alembic.command",
    "httpx",
    "typer._adapters",
)
MESSAGE_BYTES = 1 << 20


# --- the server (a process of its own: python forkserver.py SOCKET) ----------------------


def serve(socket_path: str) -> None:
    import importlib
    import pkgutil

    # Run as a script, this directory came first on the path; an accessctl process's
    # path does not have it.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    package = importlib.import_module(PRELOAD_PACKAGE)
    for module in pkgutil.walk_packages(package.__path__, f"{PRELOAD_PACKAGE}."):
        importlib.import_module(module.name)
    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:
        raise SystemExit("forkserver: a preloaded module started a thread; forking is unsafe")

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "request")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    selector.register(sys.stdin, selectors.EVENT_READ, "parent")  # EOF: the tests are gone
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "request":
                conn, _ = listener.accept()
                _start_child(conn, listener, children, (wake_read, wake_write))
            elif key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_read, 512):
                        pass
            elif not os.read(sys.stdin.fileno(), 1):
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return
        _reap(children)


def _start_child(
    conn: socket.socket,
    listener: socket.socket,
    children: dict[int, socket.socket],
    wake: tuple[int, int],
) -> None:
    message, fds, _, _ = socket.recv_fds(conn, MESSAGE_BYTES, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        # What exec would close: the server's sockets (the other children's included).
        for sock in (listener, conn, *children.values()):
            sock.close()
        for fd in wake:
            os.close(fd)
        _run_accessctl(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    conn.send(json.dumps({"pid": pid}).encode())
    children[pid] = conn


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"status": status}).encode())
            conn.close()


def _run_accessctl(request: dict[str, Any], fds: list[int]) -> None:
    """In the child: become the process the installed script would have started."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        from accessctl.entry import main

        main()  # ends the process itself (os._exit) once the command is done
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# --- the tests' side ------------------------------------------------------------------


class ForkServer:
    """One server per test process, started on first use."""

    def __init__(self) -> None:
        self._directory = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def socket_path(self) -> str:
        return str(Path(self._directory) / "socket")

    def _ensure_started(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            if not self._directory:
                self._directory = tempfile.mkdtemp(prefix="accessctl-forkserver-")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            self._process = subprocess.Popen(
                [sys.executable, __file__, self.socket_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd="/",
            )
            assert self._process.stdout is not None
            ready = self._process.stdout.readline()
            if ready.strip() != b"ready":
                raise RuntimeError(f"the fork server did not start: {ready!r}")

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> ChildLink:
        self._ensure_started()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.socket_path)
        request = {"argv": argv, "env": env, "cwd": cwd}
        socket.send_fds(conn, [json.dumps(request).encode()], fds)
        reply = json.loads(conn.recv(MESSAGE_BYTES))
        return ChildLink(int(reply["pid"]), conn)

    def close(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the server kills what is left and exits
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
        if self._directory:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            with contextlib.suppress(OSError):
                os.rmdir(self._directory)


class ChildLink:
    """The server's connection for one child: its PID now, its wait status at its end."""

    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid = pid
        self._conn = conn

    def status(self, block: bool) -> int | None:
        self._conn.setblocking(block)
        try:
            message = self._conn.recv(MESSAGE_BYTES)
        except BlockingIOError:  # not ended yet
            return None
        self._conn.close()
        if not message:
            raise RuntimeError(f"the fork server lost child {self.pid}")
        return int(json.loads(message)["status"])


class ForkedPopen(subprocess.Popen[Any]):
    """A ``subprocess.Popen`` whose child the fork server starts: everything else
    (pipes, ``communicate``, timeouts, signals) is Popen's own. The child is not this
    process's, so its end comes from the server (the overrides of Popen's POSIX
    internals below, the same in Python 3.11 to 3.13) instead of ``waitpid``."""

    def __init__(self, server: ForkServer, args: list[str], **kwargs: Any) -> None:
        self._server = server
        self._link: ChildLink | None = None
        super().__init__(args, **kwargs)

    def _execute_child(
        self,
        args: list[str],
        executable: Any,
        preexec_fn: Any,
        close_fds: Any,
        pass_fds: Any,
        cwd: Any,
        env: Any,
        startupinfo: Any,
        creationflags: Any,
        shell: Any,
        p2cread: int,
        p2cwrite: int,
        c2pread: int,
        c2pwrite: int,
        errread: int,
        errwrite: int,
        *_rest: Any,
    ) -> None:
        if preexec_fn is not None or pass_fds or shell:
            raise ValueError("the fork server starts accessctl with its standard streams only")
        fds = [p2cread, c2pwrite, errwrite]
        fds = [fd if fd != -1 else default for fd, default in zip(fds, (0, 1, 2), strict=True)]
        self._link = self._server.spawn(
            [str(a) for a in args],
            dict(os.environ if env is None else env),
            str(cwd) if cwd is not None else os.getcwd(),
            fds,
        )
        self.pid = self._link.pid
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]

    def _internal_poll(self, _deadstate: Any = None, **_ignored: Any) -> int | None:
        if self.returncode is None and self._link is not None:
            try:
                status = self._link.status(block=False)
            except OSError:
                status = None
                if _deadstate is not None:
                    self.returncode = _deadstate
            if status is not None:
                self._handle_exitstatus(status)  # type: ignore[attr-defined]
        return self.returncode

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        assert self._link is not None
        status = self._link.status(block=not wait_flags & os.WNOHANG)
        return (0, 0) if status is None else (self.pid, status)


if __name__ == "__main__":
    serve(sys.argv[1])

"""In a real terminal (a pseudo-terminal of 100 columns): the progress bar is drawn, and a
table fits the terminal with every ID whole on its line."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

from conftest import ACCESSCTL_BIN, Cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
COLUMNS = 100


def run_in_terminal(cli: Cli, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run the installed command with stdin, stdout and stderr on one pseudo-terminal;
    return its exit code and what the terminal showed, without escape sequences."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, COLUMNS, 0, 0))
    env = {**os.environ, **cli.base_env(), "TERM": "xterm-256color"}
    for name in ("COLUMNS", "LINES", "NO_COLOR"):
        env.pop(name, None)
    process = subprocess.Popen(
        [ACCESSCTL_BIN, *args], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal closed: the process is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return code, ANSI.sub("", text)


def test_progress_bar_and_tables_in_a_terminal(cli: Cli) -> None:
    users = cli.add_users(2)
    code, screen = run_in_terminal(cli, "batch", "8", "-u", users[0], "-u", users[1])
    assert code == 0, screen
    assert "filing" in screen and "8/8" in screen, screen  # the bar, drawn to its end
    assert "ETA" in screen
    [batch_id] = cli("batches", "-o", "ids").stdout.split()
    code, screen = run_in_terminal(cli, "batches")
    assert code == 0, screen
    lines = [line.rstrip("\r") for line in screen.splitlines() if line.strip()]
    assert all(len(line) <= COLUMNS for line in lines), lines
    assert not [line for line in lines if line.endswith(" ")], lines  # no padding to copy
    [row] = [line for line in lines if batch_id in line]  # whole, on one line
    assert row.split()[:5] == [batch_id, "done", "8", "8", "0"]

"""Loopback stand-ins for a Postgres server, for connection-failure tests.

``FakePostgres`` speaks just enough of the wire protocol to ask for a password and refuse
it (SQLSTATE 28P01), as a server with password authentication does: the local test server
trusts 127.0.0.1, so it cannot refuse a wrong password itself. It records the password the
client sent, so a test can prove the URL's percent-encoded password reached the driver.
``BlackHole`` accepts TCP connections and never answers, so only a connect timeout ends
the wait. Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
PROTOCOL_3 = 196608


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


class _Listener:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self._closed = threading.Event()

    def __enter__(self) -> _Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()


class BlackHole(_Listener):
    """Completes the TCP handshake (the kernel does, from the backlog) and says nothing."""


class FakePostgres(_Listener):
    """Asks every client for a cleartext password, records it, and refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.passwords: list[str] = []
        self.users: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def __enter__(self) -> FakePostgres:
        return self

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    (length,) = struct.unpack("!i", _recv_exact(conn, 4))
                    body = _recv_exact(conn, length - 4)
                    (code,) = struct.unpack("!i", body[:4])
                    if code in (SSL_REQUEST, GSSENC_REQUEST):
                        conn.sendall(b"N")  # no TLS, no GSS: go on in the clear
                        continue
                    break
                if code != PROTOCOL_3:
                    return
                fields = body[4:].split(b"\x00")
                params = dict(zip(fields[0::2], fields[1::2], strict=False))
                user = params.get(b"user", b"").decode()
                self.users.append(user)
                conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                kind = _recv_exact(conn, 1)
                (length,) = struct.unpack("!i", _recv_exact(conn, 4))
                payload = _recv_exact(conn, length - 4)
                if kind == b"p":
                    self.passwords.append(payload.rstrip(b"\x00").decode("utf-8"))
                message = f'password authentication failed for user "{user}"'
                error = (
                    b"".join(
                        tag + value.encode() + b"\x00"
                        for tag, value in (
                            (b"S", "FATAL"),
                            (b"V", "FATAL"),
                            (b"C", "28P01"),
                            (b"M", message),
                        )
                    )
                    + b"\x00"
                )
                conn.sendall(b"E" + struct.pack("!i", len(error) + 4) + error)
            except (ConnectionError, OSError, struct.error):
                return

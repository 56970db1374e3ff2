"""A minimal HTTP receiver, run as a process of its own, that answers every POST at once (200, `{}`)
and records when each request arrived, on which connection, and the `data.contact_id` of its JSON
body (a webhook provider's envelope). It also finds out which process opened each connection:
given the candidates' pids (`POST /_owners`), it looks the client's socket up in /proc at accept.

Two arrival times per request: `kernel`, when its first bytes reached this socket (the kernel's
receive timestamp, SO_TIMESTAMPNS, CLOCK_REALTIME in ns), and `loop`, time.monotonic() when this
process read them. The first is what a provider counting arrivals sees; the second adds this
process's own scheduling delays (on a loaded machine, tens of ms now and then), which are the
peer's, not the sender's.

Its own process, one thread with a selector, so that nothing of the test (the API, its polling,
the GIL) delays what it reads. No signature check: it is a clock, not a stand-in for a receiver
(tests/webhook_peer.py is that).

    python -m tests.counting_peer          # prints "listening PORT", then serves until stdin closes

Control (not recorded as deliveries):
    POST /_owners  [pid, ...]   the processes whose connections to name (before they connect)
    GET  /_log                  {"requests": [[kernel_ns, loop_s, conn, contact_id], ...],
                                 "connections": {conn: {"port": client_port, "pid": pid or null}}}
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS is the same number
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def _sockets_by_port(server_port: int) -> dict[int, str]:
    """Client port -> socket inode, for every TCP socket connected to `server_port` from its client
    side (/proc/net/tcp and tcp6)."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, inode = fields[1], fields[2], fields[9]
                    if int(remote.rsplit(":", 1)[1], 16) == server_port:
                        found[int(local.rsplit(":", 1)[1], 16)] = inode
        except OSError:
            pass
    return found


def owner_of(client_port: int, server_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the client side of the connection from `client_port`, if any."""
    inode = _sockets_by_port(server_port).get(client_port)
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == wanted:
                    return pid
            except OSError:
                continue
    return None


class _Connection:
    def __init__(self, sock: socket.socket, conn_id: int) -> None:
        self.sock, self.id = sock, conn_id
        self.buffer = b""
        self.first_at: tuple[int, float] | None = None  # when the first bytes of the buffered request came


class CountingPeer:
    def __init__(self) -> None:
        self.requests: list[tuple[int, float, int, Any]] = []
        self.connections: dict[int, dict[str, Any]] = {}
        self.owners: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # accepted sockets inherit it
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(128)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self._next_conn = 0
        self._stop = False

    def serve(self) -> None:
        self.selector.register(self.server, selectors.EVENT_READ, self._accept)
        self.selector.register(sys.stdin, selectors.EVENT_READ, self._stdin)
        print(f"listening {self.port}", flush=True)
        while not self._stop:
            for key, _ in self.selector.select():
                key.data(key.fileobj)

    def _stdin(self, stdin: Any) -> None:
        if not os.read(stdin.fileno(), 4096):  # the test closed it (or died)
            self._stop = True

    def _accept(self, server: socket.socket) -> None:
        sock, (_, client_port) = server.accept()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # in case it was not inherited
        conn = _Connection(sock, self._next_conn)
        self._next_conn += 1
        info: dict[str, Any] = {"port": client_port, "pid": None}
        self.connections[conn.id] = info
        if self.owners:  # while the client is connected, off this thread
            owners = list(self.owners)
            threading.Thread(target=lambda: info.update(pid=owner_of(client_port, self.port, owners)),
                             daemon=True).start()
        self.selector.register(sock, selectors.EVENT_READ, lambda s: self._read(conn))

    def _read(self, conn: _Connection) -> None:
        try:
            data, ancdata, _, _ = conn.sock.recvmsg(65536, socket.CMSG_SPACE(16))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        loop_at = time.monotonic()
        if not data:
            self.selector.unregister(conn.sock)
            conn.sock.close()
            return
        kernel_at = time.time_ns()  # only if the kernel gave none
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = struct.unpack("qq", cdata[:16])
                kernel_at = seconds * 1_000_000_000 + nanoseconds
        if not conn.buffer:
            conn.first_at = (kernel_at, loop_at)
        conn.buffer += data
        while True:
            head_end = conn.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = conn.buffer[:head_end].decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            _, path, _ = request_line.split(" ", 2)
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(conn.buffer) < end:
                return
            body, conn.buffer = conn.buffer[head_end + 4:end], conn.buffer[end:]
            assert conn.first_at is not None
            arrived, conn.first_at = conn.first_at, ((kernel_at, loop_at) if conn.buffer else None)
            conn.sock.setblocking(True)  # small answers: sent whole, at once
            try:
                conn.sock.sendall(self._answer(path, body, arrived, conn.id))
            except OSError:
                pass
            conn.sock.setblocking(False)

    def _answer(self, path: str, body: bytes, arrived: tuple[int, float], conn_id: int) -> bytes:
        if path == "/_log":
            answer = json.dumps({"requests": self.requests, "connections": self.connections}).encode()
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(answer)).encode() + b"\r\n\r\n" + answer)
        if path == "/_owners":
            self.owners = [int(p) for p in json.loads(body)]
            return _OK
        try:
            contact_id = json.loads(body)["data"]["contact_id"]
        except (ValueError, KeyError, TypeError):
            contact_id = None
        self.requests.append((arrived[0], arrived[1], conn_id, contact_id))
        return _OK


if __name__ == "__main__":
    CountingPeer().serve()

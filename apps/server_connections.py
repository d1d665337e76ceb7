"""The HTTP server's connections: at most N open, each read bounded by a deadline, and who gives way
when every slot is taken.

A connection is *waiting* from the moment it is accepted, or has finished an answer, until its next
request has arrived whole (line, headers and body); then it is *serving* until the answer is sent or
streamed to its end. When every slot is taken and another client connects, the connection that has
waited longest is closed to make room: an idle keep-alive connection or a client still trickling its
request, never one whose request is being answered. HTTP lets a server close an idle keep-alive
connection at any time (RFC 9112, section 9.5); clients open another.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time

log = logging.getLogger("edge_qwen.server")

MAKE_ROOM_TIMEOUT = 2.0  # seconds for a closed connection's thread to end and free its slot


class Slots:
    """At most `capacity` connections; when all are taken, the longest-waiting one makes room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = threading.BoundedSemaphore(capacity)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> time.monotonic() it began waiting
        self._closed: set[socket.socket] = set()  # closed to make room, their threads not yet ended

    def acquire(self) -> bool:
        """A slot for a new connection; False when every open connection is serving a request."""
        if self._free.acquire(blocking=False):
            return True
        with self._lock:
            if not self._waiting:
                return False
            oldest = min(self._waiting, key=self._waiting.__getitem__)
            waited = time.monotonic() - self._waiting.pop(oldest)
            self._closed.add(oldest)
        try:
            peer = oldest.getpeername()[0]
            oldest.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once: the connection ends
        except OSError:  # it was closing anyway
            peer = "?"
        log.info(
            "%s closed after waiting %.1fs for a request: all %d slots taken", peer, waited, self.capacity
        )
        return self._free.acquire(timeout=MAKE_ROOM_TIMEOUT)

    def waiting(self, connection: socket.socket) -> None:
        """The connection waits for its next request: it may be closed to make room."""
        with self._lock:
            if connection not in self._closed:
                self._waiting[connection] = time.monotonic()

    def serving(self, connection: socket.socket) -> bool:
        """Its request has arrived whole: it keeps its slot until the answer ends. False if it was
        closed to make room before that."""
        with self._lock:
            self._waiting.pop(connection, None)
            return connection not in self._closed

    def was_closed(self, connection: socket.socket) -> bool:
        """Whether the connection was closed to make room."""
        with self._lock:
            return connection in self._closed

    def release(self, connection: socket.socket) -> None:
        """The connection's thread ends: its slot is free."""
        with self._lock:
            self._waiting.pop(connection, None)
            self._closed.discard(connection)
        self._free.release()


class DeadlineReader(io.RawIOBase):
    """A socket's input in which every read waits at most `timeout` seconds and ends by `deadline`
    (time.monotonic(), None for no deadline): a sender trickling bytes cannot stretch a request's
    arrival past it. Raises TimeoutError, which the standard library's handler answers by closing."""

    def __init__(self, connection: socket.socket, timeout: float) -> None:
        super().__init__()
        self.connection = connection
        self.timeout = timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        wait = self.timeout
        if self.deadline is not None:  # past it, bytes already here are still taken (0: no waiting)
            wait = max(0.0, min(wait, self.deadline - time.monotonic()))
        self.connection.settimeout(wait)
        try:
            return self.connection.recv_into(buffer)
        except BlockingIOError:  # past the deadline, and nothing more came
            raise TimeoutError("the request did not arrive in time") from None
        finally:
            self.connection.settimeout(self.timeout)  # writes keep the plain per-operation timeout

"""The HTTP layer: the standard library's ThreadingHTTPServer, with the bounds a server on a small
device facing a network needs (docs/server.md says why this stack).

One thread per connection, at most `max_connections` of them (apps/server_connections.py: when all
are taken, the connection that has waited longest for a request is closed to make room). A request's
line and headers must arrive within `header_timeout` seconds of its first byte (or of the connection's
opening), a keep-alive connection may stay silent `idle_timeout` seconds between requests, a body must
arrive within `read_timeout`, and no read or write waits longer than that: slow senders cannot hold a
thread for long. Bodies over `max_body` bytes are refused unread (413); with an API key, every
request needs the matching `Authorization: Bearer` header (401), compared in constant time. Each
request gets one log line.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_qwen.apps.server_connections import DeadlineReader, Slots
from edge_qwen.apps.server_openai import RequestError

log = logging.getLogger("edge_qwen.server")

Route = Callable[[Any, Any], None]


@dataclass(frozen=True)
class HttpLimits:
    max_body: int = 1 << 20  # bytes
    read_timeout: float = 30.0  # seconds for a body to arrive, and for any one read or write
    header_timeout: float = 10.0  # seconds for a request's line and headers, from their first byte
    idle_timeout: float = 10.0  # seconds a keep-alive connection may wait silent for its next request
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_connections: int = 32


class Exchange:
    """One request's answer: a JSON body, or server-sent events; and whether the client is still there."""

    def __init__(self, handler: Handler, deadline: float) -> None:
        self.handler = handler
        self.deadline = deadline
        self.tokens: tuple[int, int, int] | None = None
        self.status = 0
        self.gone = False
        self.streaming = False

    def json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h = self.handler
        self.status = status
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if h.close_connection:
            h.send_header("Connection", "close")
        else:  # the answer is whole: from its first byte on, the client may send its next request
            h.server.slots.waiting(h.connection)
        h.end_headers()
        self._write(data)

    def start_events(self) -> None:
        h = self.handler
        self.status = 200
        self.streaming = True
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")  # the stream ends when the connection does
        h.end_headers()
        h.close_connection = True

    def event(self, body: dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(body).encode() + b"\n\n")

    def done(self) -> None:
        self._write(b"data: [DONE]\n\n")

    def error(self, e: RequestError) -> None:
        if self.streaming:  # headers are sent: the error is the stream's last event
            self.status = e.status
            self.event(e.body())
        else:
            self.json(e.status, e.body())

    def client_gone(self) -> bool:
        """True once the client has closed its end (checked without blocking, once per token)."""
        if not self.gone:
            sock = self.handler.connection
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                self.gone = bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:  # reset by the peer
                self.gone = True
        return self.gone

    def _write(self, data: bytes) -> None:
        try:
            self.handler.wfile.write(data)
            self.handler.wfile.flush()
        except OSError:  # BrokenPipeError, ConnectionResetError: the client left
            self.gone = True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edge-qwen"
    server: EdgeHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.read_timeout)  # each socket write waits at most this
        self.rfile.close()  # the plain reader setup() made: ours bounds each read by the request's deadline
        self.reader = DeadlineReader(self.connection, self.server.limits.read_timeout)
        self.incoming = io.BufferedReader(self.reader)
        self.rfile = self.incoming
        self.requests = 0
        # Each event is one small write: without this, Nagle's algorithm holds it back until the
        # client acknowledges the previous one.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        """Wait for the next request's first byte (a new connection: its headers, a kept-alive one: its
        idle time), then give its line and headers `header_timeout` to arrive whole."""
        limits = self.server.limits
        if self.requests:
            self.server.slots.waiting(self.connection)
        self.reader.deadline = time.monotonic() + (
            limits.idle_timeout if self.requests else limits.header_timeout
        )
        try:
            arrived = bool(self.incoming.peek(1))  # b"": the client closed, or was closed to make room
        except OSError:  # TimeoutError included: silent too long
            arrived = False
        if not arrived:
            self.close_connection = True
            return
        if self.requests:
            self.reader.deadline = time.monotonic() + limits.header_timeout
        self.requests += 1
        super().handle_one_request()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request comes from _serve

    def log_error(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.client_address[0], format % args)  # malformed requests, timeouts

    def _serve(self, method: str) -> None:
        start = time.monotonic()
        slots = self.server.slots
        if slots.was_closed(self.connection):
            self.close_connection = True  # closed to make room while its headers came: nobody to answer
            return
        ex = Exchange(self, start + self.server.limits.request_timeout)
        path = self.path.split("?", 1)[0]
        close_after = self.close_connection  # as the request's version and Connection header say
        self._body_done = method != "POST"  # set by _read_body
        try:
            route = self._route(method, path)
            self._authorize()
            body = None if method != "POST" else self._read_json(start)
            slots.serving(self.connection)
            route(ex, body)
        except RequestError as e:
            if not self._body_done:
                self._skip_body(start, close_after)
            slots.serving(self.connection)
            ex.error(e)
        except Exception:
            log.exception("%s %s failed", method, path)
            ex.error(RequestError("internal error: see the server's log", status=500))
        finally:
            self._log(method, path, ex, time.monotonic() - start)

    def _skip_body(self, start: float, close_after: bool) -> None:
        """Read and drop the body of a request refused before it was read (404, 401), so that it is
        neither taken for the next request nor left unread at close, which makes the kernel reset
        the connection and can lose the answer. A body too large or too slow ends the connection."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > self.server.limits.max_body:
            self.close_connection = True
            return
        try:
            self._read_body(int(length), start + self.server.limits.read_timeout)
            self.close_connection = close_after
        except (RequestError, OSError):
            self.close_connection = True

    def _route(self, method: str, path: str) -> Route:
        route = self.server.routes.get((method, path))
        if route is not None:
            return route
        if any(p == path for _, p in self.server.routes):
            raise RequestError(f"{method} is not allowed on {path}", status=405)
        raise RequestError(f"no such endpoint: {method} {path}", status=404)

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {key}".encode()):
            raise RequestError(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                status=401,
                kind="authentication_error",
            )

    def _read_json(self, start: float) -> Any:
        limits = self.server.limits
        kind = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise RequestError(f"Content-Type must be application/json, got {kind or 'none'!r}", status=415)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(
                "a Content-Length header is required (chunked bodies are not read)", status=411
            )
        if int(length) > limits.max_body:
            raise RequestError(f"the body is {length} bytes, over the limit of {limits.max_body}", status=413)
        data = self._read_body(int(length), start + limits.read_timeout)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None

    def _read_body(self, length: int, deadline: float) -> bytes:
        """The body, read in pieces so that a sender too slow for `deadline` is cut off (408)."""
        parts: list[bytes] = []
        left = length
        self.reader.deadline = deadline
        while left > 0:
            try:
                part = self.rfile.read1(min(left, 1 << 16))
            except TimeoutError:
                self.close_connection = self._body_done = True  # the connection ends: no more reading
                raise RequestError("the body took too long to arrive", status=408) from None
            if not part:
                self.close_connection = self._body_done = True
                raise RequestError(f"the body ended after {length - left} of {length} bytes", status=400)
            parts.append(part)
            left -= len(part)
        self._body_done = True
        return b"".join(parts)

    def _log(self, method: str, path: str, ex: Exchange, seconds: float) -> None:
        prompt, cached, generated = ex.tokens or (0, 0, 0)
        gone = " (client gone)" if ex.gone else ""
        log.info(
            "%s %s %s %d prompt=%d cached=%d generated=%d %.2fs%s",
            self.client_address[0],
            method,
            path,
            ex.status,
            prompt,
            cached,
            generated,
            seconds,
            gone,
        )


class EdgeHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with the routes, the API key and a bound on open connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[tuple[str, str], Route],
        api_key: str | None,
        limits: HttpLimits,
    ) -> None:
        self.routes = routes
        self.api_key = api_key
        self.limits = limits
        self.slots = Slots(limits.max_connections)
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire():
            log.warning(
                "%s refused: %d requests being answered", client_address[0], self.limits.max_connections
            )
            self.shutdown_request(request)
            return
        self.slots.waiting(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release(request)

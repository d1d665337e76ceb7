"""The server's connection slots: idle keep-alive connections and clients trickling their request
cannot keep a new client out, and a request being answered or streamed is never cut for them.

The rules are tested on the HTTP layer alone (no model, limits of a fraction of a second); the
scenario of idle and slow connections filling every slot, on a real `edge-qwen serve` process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import edge_qwen
from edge_qwen.apps.server_http import EdgeHTTPServer, HttpLimits
from tests.server_fixtures import LONG, SEEDED, SERVED, alone, client, get, model, tiny_package
from tests.server_process import serve

__all__ = ["model", "tiny_package"]  # fixtures

GENEROUS = 20.0  # seconds: far beyond the limits under test; reached only when a rule is missing


class Block:
    """GET /block: tells when it has begun answering, answers once released."""

    def __init__(self) -> None:
        self.answering = threading.Event()
        self.release = threading.Event()

    def __call__(self, ex: Any, body: Any) -> None:
        self.answering.set()
        self.release.wait(GENEROUS)
        ex.json(200, {"status": "released"})

    def open(self, port: int) -> socket.socket:
        """A connection whose GET /block is being answered."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS)
        sock.sendall(b"GET /block HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert self.answering.wait(GENEROUS)
        return sock

    def answer(self, sock: socket.socket) -> bytes:
        """Release the answer and read it whole (b"" when the connection was closed first)."""
        self.release.set()
        data = b""
        while not data.endswith(b"}"):
            part = sock.recv(4096)
            if not part:
                return b""
            data += part
        return data


@contextmanager
def http_layer(limits: HttpLimits, block: Block) -> Iterator[int]:
    """EdgeHTTPServer on a free port with GET /health and GET /block."""

    def health(ex: Any, body: Any) -> None:
        ex.json(200, {"status": "ok"})

    routes = {("GET", "/health"): health, ("GET", "/block"): block}
    server = EdgeHTTPServer(("127.0.0.1", 0), routes, None, limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        block.release.set()
        server.shutdown()
        server.server_close()


def ask(port: int, path: str = "/health", sock: socket.socket | None = None) -> tuple[socket.socket, bytes]:
    """Send GET `path` with keep-alive (on `sock`, or a new connection) and read the whole answer;
    b"" when the server closed the connection instead."""
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"}"):
            part = sock.recv(4096)
            if not part:
                return sock, b""
            answer += part
        return sock, answer
    except OSError:  # reset, or a broken pipe: refused
        return sock, b""


def seconds_until_closed(sock: socket.socket, trickle: bool) -> float | None:
    """How long until the server closes `sock` (None: still open after GENEROUS), sending one byte of
    a header every 0.1 s meanwhile when `trickle` (a line never ends, nor do the headers)."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < GENEROUS:
        try:
            if trickle:
                sock.sendall(b"a")
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:  # reset: closed too
            return time.monotonic() - start
    return None


def test_a_request_trickling_its_headers_is_cut_at_the_header_timeout() -> None:
    limits = HttpLimits(header_timeout=0.5, idle_timeout=60, read_timeout=60)
    with http_layer(limits, Block()) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        closed_after = seconds_until_closed(sock, trickle=True)
        sock.close()
        assert closed_after is not None, "a client sending a byte every 0.1 s kept its connection"
        _, answer = ask(port)
        assert b'"ok"' in answer


def test_an_idle_keep_alive_connection_serves_a_next_request_then_is_closed() -> None:
    limits = HttpLimits(header_timeout=60, idle_timeout=1.0, read_timeout=60)
    with http_layer(limits, Block()) as port:
        sock, first = ask(port)
        _, second = ask(port, sock=sock)  # at once, well within the idle time: the same connection answers
        assert b'"ok"' in first and b'"ok"' in second
        assert seconds_until_closed(sock, trickle=False) is not None
        sock.close()


def test_when_all_slots_are_taken_the_longest_waiting_connection_makes_room() -> None:
    block = Block()
    limits = HttpLimits(max_connections=2, header_timeout=60, idle_timeout=60, read_timeout=60)
    with http_layer(limits, block) as port:
        busy = block.open(port)  # being answered: keeps its slot whatever comes
        idle, answer = ask(port)
        assert b'"ok"' in answer
        newcomer, answer = ask(port)  # both slots taken: the idle connection gives way
        assert b'"ok"' in answer
        assert seconds_until_closed(idle, trickle=False) is not None
        latest, answer = ask(port)  # and then the newcomer, idle in its turn
        assert b'"ok"' in answer
        assert seconds_until_closed(newcomer, trickle=False) is not None
        assert b'"released"' in block.answer(busy), "the connection being answered was closed to make room"
        for sock in (idle, newcomer, latest, busy):
            sock.close()


def test_a_new_connection_is_refused_only_when_every_slot_is_answering() -> None:
    block = Block()
    limits = HttpLimits(max_connections=1, header_timeout=60, idle_timeout=60, read_timeout=60)
    with http_layer(limits, block) as port:
        busy = block.open(port)
        refused, answer = ask(port)
        assert answer == b""
        assert b'"released"' in block.answer(busy)
        refused.close()
        _, answer = ask(port, sock=busy)  # the slot is free again
        assert b'"ok"' in answer
        busy.close()


def trickle(port: int, stop: threading.Event) -> None:
    """A slowloris: a request line, then a header line every 0.5 s until `stop` or the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=GENEROUS) as sock:
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while not stop.wait(0.5):
                sock.sendall(b"X-Slow: 1\r\n")
        except OSError:  # closed by the server
            return


def test_idle_and_trickling_connections_in_every_slot_keep_no_client_out(
    tiny_package: Path, model: edge_qwen.Model
) -> None:
    with serve(tiny_package, "--max-tokens", "1000") as running:
        port = int(running.url.rsplit(":", 1)[1])
        streamed: list[str | None] = []
        generating = threading.Event()

        def read_stream() -> None:
            stream = client(running).completions.create(
                model="tiny", prompt="The capital", max_tokens=LONG, temperature=0, stream=True
            )
            for chunk in stream:
                generating.set()
                streamed.append(chunk.choices[0].finish_reason)

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert generating.wait(GENEROUS)  # its request is being answered
        idle = [ask(port) for _ in range(34)]  # with the stream, more than the 32 slots
        assert all(b'"ok"' in answer for _, answer in idle)
        stop = threading.Event()
        slow = [threading.Thread(target=trickle, args=(port, stop)) for _ in range(4)]
        for thread in slow:
            thread.start()
        try:
            messages = [{"role": "user", "content": "The capital of France"}]
            reply = client(running).chat.completions.create(model="tiny", messages=messages, **SEEDED)  # type: ignore[call-overload]
            assert reply.choices[0].message.content == alone(model, messages, **SERVED)
            status, health = get(running, "/health")
            assert status == 200 and health["status"] == "ok"
        finally:
            stop.set()
            for thread in slow:
                thread.join()
            for sock, _ in idle:
                sock.close()
        reader.join()
        assert streamed[-1] == "length"  # the stream in flight ran to its end
        line = running.wait_for_log("/v1/completions", 1)[0]
        assert f"generated={LONG} " in line and "client gone" not in line

"""`edge-qwen serve` under load and abuse: slow clients that trickle their request (slowloris), 50
requests from 8 clients at once, and the server's memory and /health afterwards. (Malformed JSON,
oversized bodies, the API key, the queue bound and clients that leave mid-stream: tests/test_server.py.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_qwen
from edge_qwen.apps.server_openai import DEFAULT_SAMPLING
from tests.server_fixtures import client, get, model, tiny_package
from tests.server_process import ServerProcess, serve

__all__ = ["model", "tiny_package"]  # fixtures

PROMPTS = ["The capital", "def f(x):", "巴黎是", "return x", "The capital of France", "Paris", "x * 2", "of"]
GREEDY = {"max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_package: Path) -> Iterator[ServerProcess]:
    with serve(tiny_package, "--max-tokens", "1000") as running:
        yield running


def rss_kb(server: ServerProcess) -> int:
    """The server process's resident size (VmRSS), in kB."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def slow_client(server: ServerProcess, stop: threading.Event, body: bool) -> None:
    """A slowloris: sends a request a few bytes at a time until `stop`, never finishing it."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:  # whole headers, then a body that never arrives in full
            head += "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        sock.sendall(head.encode())
        while not stop.wait(0.5):
            try:
                sock.sendall(b"X-Slow: 1\r\n" if not body else b" ")
            except OSError:  # the server cut us off: what it should do eventually
                return


def ask_all(server: ServerProcess, prompts: list[str]) -> list[str]:
    """Send the prompts from 8 threads at once, each thread taking every 8th; the answers in order."""
    answers: dict[int, str] = {}

    def worker(first: int) -> None:
        with client(server) as api:  # closes its keep-alive connection after, as a well-behaved client does
            for i in range(first, len(prompts), 8):
                reply = api.completions.create(model="tiny", prompt=prompts[i], **GREEDY)  # type: ignore[call-overload]
                answers[i] = reply.choices[0].text

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [answers.get(i, "<no answer>") for i in range(len(prompts))]


def test_slow_clients_do_not_hold_up_the_others(server: ServerProcess, model: edge_qwen.Model) -> None:
    stop = threading.Event()
    slow = [threading.Thread(target=slow_client, args=(server, stop, i % 2 == 1)) for i in range(8)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1.0)  # all eight are connected and trickling
        expected = [model.generate(p, chat=False, **{**DEFAULT_SAMPLING, **GREEDY}) for p in PROMPTS]
        assert ask_all(server, PROMPTS) == expected
        status, health = get(server, "/health")
        assert status == 200 and health["status"] == "ok"
    finally:
        stop.set()
        for thread in slow:
            thread.join()


def test_fifty_requests_from_eight_clients_and_memory_stays_flat(
    server: ServerProcess,
    model: edge_qwen.Model,
) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(50)]
    expected = [model.generate(p, chat=False, **{**DEFAULT_SAMPLING, **GREEDY}) for p in prompts]
    assert ask_all(server, prompts) == expected  # the first 50: warm-up (caches, arenas, threads)
    warm = rss_kb(server)
    for _ in range(2):
        assert ask_all(server, prompts) == expected
    grown_mb = (rss_kb(server) - warm) / 1024
    assert grown_mb < 16, f"the server's RSS grew {grown_mb:.1f} MB over 100 more requests"
    status, health = get(server, "/health")
    assert status == 200 and health["status"] == "ok"
    lines = server.request_lines("/v1/completions")
    assert sum(" 200 " in line for line in lines) >= 150 and not any(" 500 " in line for line in lines)

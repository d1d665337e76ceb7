#!/usr/bin/env python3
"""`edge-qwen serve` against the in-process API on the same prompts: time to first token, decode speed,
the server's overhead per token, and the server's resident memory idle and under concurrent clients.

    python bench/server.py PACKAGE [--rounds 5] [--max-tokens 128] [--clients 8]

Rounds interleave the two paths (in-process, then through the server) so that load from other
programs falls on both alike. Each round's prompt starts with the round number, so neither path finds
it cached. Greedy decoding; both paths generate the same tokens. The server is a child process on a
free loopback port; the client reads its server-sent events with http.client. Linux only (reads
/proc/PID/status).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

QUESTION = "Round {}: write a Python function that checks whether a number is prime, and explain it."
SERVING = re.compile(r"at http://127\.0\.0\.1:(\d+)/v1")


def in_process(model: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token's text, decode tokens/s, tokens) through Model.stream."""
    start = time.perf_counter()
    first = None
    n = 0
    for piece in model.stream(messages, temperature=0.0, max_tokens=max_tokens):
        n = piece.generated_tokens
        if first is None and piece.text:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - start, (n - 1) / (end - first), n


def through_server(port: int, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content chunk, decode tokens/s, tokens) over HTTP, streamed."""
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "repetition_penalty": 1.0}
    body |= {"top_k": 0, "top_p": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    tokens = 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    end = time.perf_counter()
    connection.close()
    assert first is not None
    return first - start, (tokens - 1) / (end - first), tokens


def per_token_work(tokens: int = 20000) -> float:
    """Microseconds of the server's own work per streamed token, without the model: building the
    chunk, writing its event to a socket and checking that the client is still there."""
    import socket
    from types import SimpleNamespace

    from edge_qwen.apps.server_http import Exchange
    from edge_qwen.apps.server_openai import chat_chunk

    ours, theirs = socket.socketpair()
    threading.Thread(
        target=lambda: [None for _ in iter(lambda: theirs.recv(1 << 16), b"")], daemon=True
    ).start()
    handler = SimpleNamespace(connection=ours, wfile=ours.makefile("wb"))
    exchange = Exchange(handler, deadline=time.monotonic() + 3600)  # type: ignore[arg-type]
    start = time.perf_counter()
    for _ in range(tokens):
        exchange.event(chat_chunk("chatcmpl-0", "model", {"content": " token"}, None))
        exchange.client_gone()
    seconds = time.perf_counter() - start
    ours.close()
    return seconds / tokens * 1e6


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1000, int(fields["VmHWM"].split()[0]) / 1000


def start_server(package: Path, clients: int) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "serve", str(package), "--port", "0"]
    process = subprocess.Popen([*cmd, "--queue", str(clients)], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        found = SERVING.search(line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
            return process, int(found.group(1))
    raise RuntimeError("the server did not start")


def concurrent(port: int, clients: int, max_tokens: int, pid: int) -> tuple[float, float]:
    """Peak RSS sampled while `clients` ask at once, and the wall time until all are answered."""
    peak = 0.0
    threads = [
        threading.Thread(
            target=through_server,
            args=(port, [{"role": "user", "content": QUESTION.format(100 + i)}], max_tokens),
        )
        for i in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid)[0])
        time.sleep(0.05)
    return peak, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    import edge_qwen

    model = edge_qwen.load(args.package)
    server, port = start_server(args.package, args.clients)
    try:
        idle = rss_mb(server.pid)[0]
        runs: dict[str, list[tuple[float, float, int]]] = {"in-process": [], "server": []}
        for r in range(args.rounds):
            messages = [{"role": "user", "content": QUESTION.format(r)}]
            runs["in-process"].append(in_process(model, messages, args.max_tokens))
            runs["server"].append(through_server(port, messages, args.max_tokens))
        after_one = rss_mb(server.pid)[0]
        peak, wall = concurrent(port, args.clients, args.max_tokens, server.pid)
        report(runs, idle, after_one, peak, wall, args)
        print(f"server work per streamed token, without the model: {per_token_work():.0f} us")
    finally:
        server.terminate()
        server.wait(timeout=30)


def report(
    runs: dict[str, list[tuple[float, float, int]]],
    idle: float,
    after_one: float,
    peak: float,
    wall: float,
    args: argparse.Namespace,
) -> None:
    for name, values in runs.items():
        ttft = statistics.median(v[0] for v in values) * 1000
        speed = statistics.median(v[1] for v in values)
        print(f"{name:11s} first token {ttft:7.1f} ms   decode {speed:6.2f} tok/s   tokens {values[0][2]}")
    # Per round, so that contention cancels: the extra time per token through the server.
    extra = [1000 / s[1] - 1000 / i[1] for i, s in zip(runs["in-process"], runs["server"], strict=True)]
    ratio = [s[1] / i[1] for i, s in zip(runs["in-process"], runs["server"], strict=True)]
    ttft_extra = [(s[0] - i[0]) * 1000 for i, s in zip(runs["in-process"], runs["server"], strict=True)]
    print(f"server overhead per token {statistics.median(extra):+.2f} ms (median of rounds)")
    print(f"server/in-process decode speed {statistics.median(ratio):.3f}")
    print(f"server - in-process first token {statistics.median(ttft_extra):+.1f} ms")
    print(f"server RSS idle {idle:.0f} MB, after one request {after_one:.0f} MB")
    print(f"server RSS peak under {args.clients} clients {peak:.0f} MB")
    print(f"{args.clients} clients x {args.max_tokens} tokens answered in {wall:.1f} s")


if __name__ == "__main__":
    main()

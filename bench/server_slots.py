#!/usr/bin/env python3
"""Can a new client get through when idle keep-alive connections and slow senders take every slot?

    nice -n 10 python bench/server_slots.py [PACKAGE] [--connections 36] [--give-up 60]

Starts `edge-qwen serve PACKAGE` on a free loopback port and, one scenario after another, opens
`--connections` connections that each hold a slot without asking anything:

- idle: each sends one GET /health with keep-alive, reads the answer and stays silent;
- slowloris: each sends a request line and a header's name, then one byte of its value every 0.5 s;
- mixed: 4 slowloris, then idle ones, while a streamed chat answer of 48 tokens is in flight.

With them open, a fresh client (the OpenAI SDK, no retries of its own) asks for a one-token chat
answer, retrying every 0.25 s, and then a fresh connection asks GET /health the same way: the
seconds until each succeeds, or `null` after `--give-up` seconds. Then, with every slot free, how
long the server keeps one idle keep-alive connection and one slowloris before closing them (capped
at `--give-up`). Prints JSON; `--json PATH` keeps it. `--command` runs another build's CLI, so that
the same scenarios measure the server before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PACKAGE = Path.home() / ".cache/edge-qwen-bench/compare/qwen2.5-coder-0.5b-instruct-int4"
SERVING = re.compile(r"at http://127\.0\.0\.1:(\d+)/v1")


def start_server(command: list[str], package: Path) -> tuple[subprocess.Popen[str], int]:
    cmd = [*command, "serve", str(package), "--port", "0"]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        found = SERVING.search(line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # drain the log
            return process, int(found.group(1))
    raise RuntimeError("the server did not start")


def idle_connection(port: int) -> socket.socket | None:
    """A connection that asked GET /health once and keeps quiet; None if the server refused it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = sock.recv(4096)
            if not part:
                raise ConnectionError("closed")
            answer += part
        return sock
    except OSError:
        sock.close()
        return None


TRICKLE_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # then a byte every 0.5 s


def slowloris(port: int, stop: threading.Event) -> None:
    """Sends a request's head one byte every 0.5 s until `stop` or the server closes: its header
    line never ends (a line a time would meet the standard library's limit of 100 headers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(TRICKLE_HEAD)
            while not stop.wait(0.5):
                sock.sendall(b"a")
    except OSError:
        return


def until_served(call: Callable[[], None], give_up: float) -> dict[str, Any]:
    """Seconds until `call` succeeds, retried every 0.25 s; None after `give_up` seconds."""
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            call()
            return {"seconds": round(time.monotonic() - start, 3), "attempts": attempts}
        except Exception as e:  # refused, reset, timed out: try again
            if time.monotonic() - start > give_up:
                return {"seconds": None, "attempts": attempts, "last_error": type(e).__name__}
            time.sleep(0.25)


def fresh_requests(port: int, give_up: float) -> dict[str, Any]:
    import http.client

    import openai

    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=give_up
    )

    def chat() -> None:
        messages = [{"role": "user", "content": "Hi"}]
        api.chat.completions.create(model="m", messages=messages, max_tokens=1, temperature=0)  # type: ignore[arg-type]

    def health() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=give_up)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            if response.status != 200 or json.loads(response.read())["status"] != "ok":
                raise RuntimeError(f"/health answered {response.status}")
        finally:
            connection.close()

    try:
        return {"chat": until_served(chat, give_up), "health": until_served(health, give_up)}
    finally:
        api.close()  # its kept-alive connection would hold a slot into the next scenario


def stream_in_flight(port: int, result: dict[str, Any]) -> None:
    """A streamed chat answer of 48 tokens, read to its end: how many chunks arrived."""
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    messages: Any = [{"role": "user", "content": "Write a Python function that sorts a list."}]
    chunks = 0
    try:
        stream = api.chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=48,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            chunks += bool(chunk.choices and chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason if chunk.choices else None
            if finish:
                result["finish_reason"] = finish
    except Exception as e:
        result["error"] = type(e).__name__
    finally:
        api.close()
    result["content_chunks"] = chunks


def scenario(port: int, kind: str, n: int, give_up: float) -> dict[str, Any]:
    stop = threading.Event()
    trickling = [
        threading.Thread(target=slowloris, args=(port, stop))
        for _ in range(n if kind == "slowloris" else 4 if kind == "mixed" else 0)
    ]
    streamed: dict[str, Any] = {}
    streaming = threading.Thread(target=stream_in_flight, args=(port, streamed))
    if kind == "mixed":
        streaming.start()
        time.sleep(1.0)  # the stream holds its connection and the model
    for thread in trickling:
        thread.start()
    time.sleep(1.0)
    idle = [idle_connection(port) for _ in range(n - len(trickling) if kind != "slowloris" else 0)]
    time.sleep(0.5)
    result: dict[str, Any] = {
        "scenario": kind,
        "slowloris": len(trickling),
        "idle_asked": len(idle),
        "idle_refused": sum(sock is None for sock in idle),
    }
    result |= fresh_requests(port, give_up)
    result["idle_closed_by_server"] = sum(closed(sock) for sock in idle if sock is not None)
    stop.set()
    for sock in idle:
        if sock is not None:
            sock.close()
    for thread in trickling:
        thread.join()
    if kind == "mixed":
        streaming.join()
        result["stream"] = streamed
    return result


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (checked without blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def lifetime(sock: socket.socket, cap: float, out: dict[str, Any], key: str) -> None:
    """Seconds until the server closes `sock` (None: still open after `cap`)."""
    start = time.monotonic()
    sock.settimeout(cap)
    try:
        while sock.recv(4096):
            pass
        out[key] = round(time.monotonic() - start, 2)
    except TimeoutError:
        out[key] = None
    except OSError:
        out[key] = round(time.monotonic() - start, 2)


def lifetimes(port: int, cap: float) -> dict[str, Any]:
    """With slots free: how long an idle keep-alive connection and a slowloris are kept."""
    out: dict[str, Any] = {}
    stop = threading.Event()
    idle = idle_connection(port)
    assert idle is not None
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(TRICKLE_HEAD)

    def trickle() -> None:
        while not stop.wait(0.5):
            try:
                slow.sendall(b"a")
            except OSError:
                return

    threads = [
        threading.Thread(target=lifetime, args=(idle, cap, out, "idle_keepalive_seconds")),
        threading.Thread(target=lifetime, args=(slow, cap, out, "slowloris_seconds")),
        threading.Thread(target=trickle),
    ]
    for thread in threads:
        thread.start()
    for thread in threads[:2]:
        thread.join()
    stop.set()
    threads[2].join()
    idle.close()
    slow.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path, nargs="?", default=DEFAULT_PACKAGE)
    p.add_argument("--connections", type=int, default=36, help="connections opened to hold the slots")
    p.add_argument("--give-up", type=float, default=60.0, help="seconds")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--command",
        default=f"{sys.executable} -m edge_qwen.apps.cli",
        help="the CLI to start the server with (another build of it, for an A/B)",
    )
    args = p.parse_args()
    process, port = start_server(shlex.split(args.command), args.package)
    try:
        results: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
        results["scenarios"] = [
            scenario(port, kind, args.connections, args.give_up) for kind in ("idle", "slowloris", "mixed")
        ]
        time.sleep(2.0)  # the scenarios' connections are gone
        results["with_free_slots"] = lifetimes(port, args.give_up)
        results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        process.terminate()
        process.wait()
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()

"""`edge-qwen serve` as a real process on a loopback port, for tests: started on a free port (port 0,
read back from its first log line), its log collected, and always stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVING = re.compile(r"serving .* at http://[^:]+:(\d+)/v1")
START_TIMEOUT = 120.0  # seconds: loading packs the weights once per machine


class ServerProcess:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._started = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            found = SERVING.search(line)
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"  # any address it binds includes loopback
                self._started.set()
        self._started.set()  # the process ended: wait no longer

    def wait_started(self) -> None:
        if not self._started.wait(START_TIMEOUT) or not self.url:
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-20:]))

    def request_lines(self, path: str) -> list[str]:
        """The log lines of finished requests to `path`."""
        return [line for line in self.lines if f" {path} " in line]

    def wait_for_log(self, path: str, count: int, timeout: float = 30.0) -> list[str]:
        """The first `count` request lines of `path`, once logged (a request logs as it ends)."""
        end = time.monotonic() + timeout
        while len(self.request_lines(path)) < count and time.monotonic() < end:
            time.sleep(0.02)
        return self.request_lines(path)


@contextmanager
def serve(package: Path, *args: str) -> Iterator[ServerProcess]:
    """Run `edge-qwen serve package --port 0 *args` until the block ends."""
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "serve", str(package), "--port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    server = ServerProcess(process)
    try:
        server.wait_started()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

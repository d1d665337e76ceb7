#!/usr/bin/env python3
"""The peers of bench/compare.py, run and measured: llama.cpp's llama-bench and onnxruntime-genai.

Each is built once by its ../shared/peers script (cached there) and run as a fresh process per
round; `run_measured` also gives any command's peak RSS (bench/compare.py runs ours through it too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_qwen.apps.benchmark import package_size, status_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PEERS = Path(os.environ.get("EDGE_QWEN_PEERS", Path.home() / ".cache" / "edge-qwen-peers"))
RUN_TIMEOUT = 3600  # seconds for one engine run
RSS_POLL_SECONDS = 0.02
Metrics = dict[str, float | None]


def peer_script(name: str) -> str:
    """Run a ../shared/peers script (each builds once, then answers from its cache); its last line."""
    out = subprocess.run(["bash", str(SHARED / "peers" / name)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({out.returncode}): {_tail(out.stderr)}")
    return out.stdout.strip().splitlines()[-1]


def run_genai(folder: Path, args: argparse.Namespace) -> Metrics:
    python = PEERS / "genai-venv" / "bin" / "python"
    script = SHARED / "peers" / "ortgenai_bench.py"
    done = run_measured(
        [str(python), str(script), str(folder), str(args.gen_tokens), str(args.prompt_tokens)]
    )
    d = json.loads(done.stdout.strip().splitlines()[-1])
    if d["prompt"] != args.prompt_tokens or d["new"] != args.gen_tokens:
        raise RuntimeError(f"ortgenai_bench.py ran {d['prompt']} + {d['new']} tokens, not the protocol's")
    return {
        "prefill_tps": d["prefill_tps"],
        "decode_tps": d["decode_tps"],
        "ttft_s": d["prefill_s"],
        "load_s": d["load_s"],
        "peak_rss_bytes": done.peak_rss_bytes,  # not its own ru_maxrss: inherited from this process
        "peak_anon_bytes": done.peak_anon_bytes,
        "peak_file_bytes": done.peak_file_bytes,
        "size_bytes": package_size(folder),
    }


def run_llama(bin_dir: Path, gguf: Path, args: argparse.Namespace) -> Metrics:
    p, n = args.prompt_tokens, args.gen_tokens
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(args.threads)]
    cmd += ["-p", str(p), "-n", str(n), "-r", "1", "-o", "json"]
    done = run_measured(cmd)
    tests = json.loads(done.stdout)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] == p and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_prompt"] == 0 and t["n_gen"] == n)
    return {
        "prefill_tps": pp,
        "decode_tps": tg,
        "ttft_s": p / pp,
        "load_s": None,  # llama-bench does not report one
        "peak_rss_bytes": done.peak_rss_bytes,
        "peak_anon_bytes": done.peak_anon_bytes,
        "peak_file_bytes": done.peak_file_bytes,
        "size_bytes": gguf.stat().st_size,
    }


@dataclass(frozen=True)
class Finished:
    stdout: str
    peak_rss_bytes: int  # VmHWM: anonymous and file-backed pages together, at the highest
    # The highest RssAnon (the heap: not reclaimable) and RssFile (mapped files, such as weights: the
    # kernel can drop them under memory pressure and read them again) seen while polling.
    peak_anon_bytes: int
    peak_file_bytes: int


def run_measured(cmd: list[str], timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None) -> Finished:
    """Run `cmd` to its end: its stdout and its peak RSS, VmHWM (and RssAnon, RssFile) polled from
    /proc while it runs.

    Not wait4's ru_maxrss: a child of this process (which holds calibration statistics and export
    buffers) inherits its high-water mark through vfork + exec; VmHWM starts afresh at exec.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not stop.is_set():
            with contextlib.suppress(OSError):  # once it has exited there is nothing to read
                for key, value in status_bytes(status.read_text(), tuple(peak)).items():
                    peak[key] = max(peak[key], value)
            stop.wait(RSS_POLL_SECONDS)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    finally:
        stop.set()
        watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {_tail(stderr)}")
    return Finished(stdout, peak["VmHWM"], peak["RssAnon"], peak["RssFile"])


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def genai_version() -> str:
    python = PEERS / "genai-venv" / "bin" / "python"
    code = "import onnxruntime_genai as g, onnxruntime as o; print(g.__version__, '/ ort', o.__version__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def llama_version(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].removeprefix("version: ") if text else bin_dir.parent.name

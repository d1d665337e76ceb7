#!/usr/bin/env python3
"""A first `edge-qwen chat` on an empty cache, timed from the end of the download to the first answer.

    python bench/first_run.py [--gguf MODEL.gguf] [--recipe default|exact|small] [--json out.json]

The GGUF is copied into a fresh EDGE_QWEN_HOME's downloads/ folder first, as the catalog's PyPI source
leaves it (it is verified by size and sha256, as a download is, and that time counts). With the
default recipe `edge-qwen chat` is run with no model argument, as a user would; another recipe is
pulled with `edge-qwen pull --recipe` and then chatted with. Reported: seconds from the start to
the first byte of the answer on stdout, the chat process's peak RSS (with the default recipe the
conversion runs in it) with its anonymous and file-backed parts, and the recipe the package records.
The Hugging Face hub is put offline (HF_HUB_OFFLINE), so that the time is the conversion's, not a
network timeout's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_GGUF = Path.home() / ".cache" / "edge-qwen-models" / f"{MODEL}.gguf"
QUESTION = "What is the capital of France? Answer in one word."


FIELDS = ("VmHWM", "RssAnon", "RssFile")  # the peak resident set; its anonymous and file-backed parts


def follow_memory(process: subprocess.Popen[bytes], peaks: dict[str, int]) -> None:
    """The largest value of each of FIELDS in /proc/PID/status, read every 50 ms until the process ends.

    The file-backed part (the mapped weights, the GGUF's pages) is clean: the kernel can drop it under
    memory pressure. The anonymous part is what a small board must hold."""
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            lines = status.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            key, _, value = line.partition(":")
            if key in FIELDS:
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        time.sleep(0.05)


def first_answer(cmd: list[str], env: dict[str, str]) -> tuple[float, str, dict[str, int]]:
    """Seconds to the first byte on stdout, all of stdout, and the process's peak memory (FIELDS)."""
    start = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=False
    )
    assert p.stdin is not None and p.stdout is not None
    peaks: dict[str, int] = {}
    follower = threading.Thread(target=follow_memory, args=(p, peaks), daemon=True)
    follower.start()
    p.stdin.write(QUESTION.encode() + b"\n")
    p.stdin.close()
    first = p.stdout.read(1)
    seconds = time.perf_counter() - start
    rest = p.stdout.read()
    p.wait()
    follower.join()
    if p.returncode != 0 or not first:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}); run it by hand to see why")
    return seconds, (first + rest).decode(errors="replace"), peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    p.add_argument("--recipe", default="default", choices=["default", "exact", "small"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"no GGUF at {args.gguf}: run ../shared/models/fetch_gguf.py {MODEL}")
    home = Path(tempfile.mkdtemp(prefix="edge-qwen-first-run-"))
    try:
        (home / "downloads").mkdir()
        shutil.copyfile(args.gguf, home / "downloads" / f"{MODEL}.gguf")
        env = {**os.environ, "EDGE_QWEN_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cli = [sys.executable, "-m", "edge_qwen.apps.cli"]
        chat = [*cli, "chat", "--temperature", "0", "--max-tokens", "16"]
        start = time.perf_counter()
        if args.recipe != "default":
            pull = [*cli, "pull", MODEL, "--recipe", args.recipe]
            subprocess.run(pull, env=env, check=True, stdout=subprocess.DEVNULL)
            package = home / "packages" / f"{MODEL}-int4-{args.recipe}"
            chat.append(str(package))
        else:
            package = home / "packages" / f"{MODEL}-int4"
        pulled = time.perf_counter() - start
        seconds, answer, peaks = first_answer(chat, env)
        seconds += pulled
        recipe = json.loads((package / "edge_qwen.json").read_text())["quantization"]["recipe"]
        size = sum(f.stat().st_size for f in package.iterdir() if f.is_file())
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report = {
        "recipe": args.recipe,
        "package_recipe": recipe,
        "seconds_to_first_answer": round(seconds, 1),
        "peak_rss_bytes": peaks.get("VmHWM"),
        "peak_anon_bytes": peaks.get("RssAnon"),
        "peak_file_bytes": peaks.get("RssFile"),
        "gguf_bytes": args.gguf.stat().st_size,
        "package_bytes": size,
        "answer": answer.strip(),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

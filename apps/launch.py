"""The `edge-qwen` command's entry point: restart with huge pages for the weights, then run the CLI.

glibc reads GLIBC_TUNABLES once, when a process starts, so asking it for huge pages (see
edge_qwen/memory.py, `huge_page_tunables`) means starting again: exec replaces this process with the
same command line and one more environment variable, before ONNX Runtime or numpy is imported (~20 ms).
Library users set the variable themselves (README, "Speed").
"""

from __future__ import annotations

import contextlib
import os
import sys

from edge_qwen.memory import huge_page_tunables


def main() -> None:
    tunables = huge_page_tunables(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if tunables is not None and argv and sys.executable:
        # No exec here (a sandbox, a frozen app): run as we are, a little slower.
        with contextlib.suppress(OSError):
            os.execve(sys.executable, argv, {**os.environ, "GLIBC_TUNABLES": tunables})
    from edge_qwen.apps.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()

"""A virtual environment with optimum, made once and cached outside the clone, for the optimum tests.

Why a separate environment: optimum-onnx, the current home of `ORTModelForCausalLM` (0.1.0 on the
package index), pins `transformers<4.58` and `optimum~=2.1`, while the dev extras test against
transformers 5. Installing it beside them would downgrade the transformers every other test
compares against. So the tests do what a user of optimum would: a virtual environment with the
`hf` extra's requirements (pyproject.toml), on the same onnxruntime and CPU torch as the dev
extras, made once (about a minute and 1.3 GB, from the package index alone) under
~/.cache/edge-qwen-ci/, keyed by those requirements, and renamed into place when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import onnxruntime
import torch

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("optimum_probe.py")


def requirements() -> list[str]:
    """The `hf` extra, with onnxruntime and torch pinned to the versions the dev extras run."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_version = torch.__version__.split("+")[0]
    return [*extras["hf"], f"onnxruntime=={onnxruntime.__version__}", f"torch=={torch_version}"]


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_QWEN_CI_CACHE", Path.home() / ".cache" / "edge-qwen-ci"))


def optimum_python() -> Path:
    """The environment's python, the environment made first if this machine has none yet."""
    reqs = requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    root = cache_root()
    env = root / f"optimum-{key}"
    python = env / "bin" / "python"
    if python.is_file():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".optimum.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be making it
        if python.is_file():
            return python
        work = root / f".optimum-{key}.{os.getpid()}.partial"
        shutil.rmtree(work, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(work)], check=True)
            pip = [
                str(work / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ]
            subprocess.run([*pip, *reqs], check=True, timeout=1800)
            for stale in root.glob("optimum-*"):  # environments of older requirements
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(work, env)  # a venv's python finds its packages from its own folder
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return python

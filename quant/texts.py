"""Offline, license-clean texts for calibration and evaluation, taken from Python's own standard library.

Evaluation and calibration texts never overlap. Each `Text` records exactly which files (or
documentation topics) it holds and their sha256, since they vary with the Python version.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Plain, typical Python modules (PSF licence), about 30k tokens each list.
EVAL_CODE_FILES = (
    "textwrap.py",
    "heapq.py",
    "fractions.py",
    "statistics.py",
    "shlex.py",
    "graphlib.py",
    "colorsys.py",
    "bisect.py",
    "queue.py",
    "sched.py",
    "fnmatch.py",
    "string.py",
)
CALIBRATION_CODE_FILES = (
    "argparse.py",
    "dataclasses.py",
    "csv.py",
    "json/encoder.py",
    "json/decoder.py",
    "base64.py",
    "calendar.py",
)
BUILTIN_TEXTS = ("code", "prose", "calibration")


@dataclass(frozen=True)
class Text:
    """A named text and where it came from."""

    name: str
    text: str
    sources: tuple[str, ...]  # "file sha256-prefix" entries

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "python": sys.version.split()[0],
            "characters": len(self.text),
            "sources": list(self.sources),
        }


def builtin_text(name: str) -> Text:
    """'code' and 'prose' are for evaluation; 'calibration' mixes other code and other prose."""
    if name == "code":
        return _join("code", [_stdlib_file(f) for f in EVAL_CODE_FILES])
    if name == "prose":
        return _join("prose", _doc_topics(even=True))
    if name == "calibration":
        return _join(
            "calibration", [_stdlib_file(f) for f in CALIBRATION_CODE_FILES] + _doc_topics(even=False)
        )
    raise ValueError(f"unknown built-in text {name!r}: use one of {', '.join(BUILTIN_TEXTS)} or a file path")


def load_text(spec: str) -> Text:
    """A built-in text by name, or a UTF-8 file."""
    if spec in BUILTIN_TEXTS:
        return builtin_text(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path} (or use one of {', '.join(BUILTIN_TEXTS)})")
    text = path.read_text(encoding="utf-8")
    return Text(path.name, text, (f"{path} {_sha(text)}",))


def _stdlib_file(relative: str) -> tuple[str, str]:
    path = Path(sysconfig.get_paths()["stdlib"]) / relative
    return f"stdlib/{relative}", path.read_text(encoding="utf-8")


def _doc_topics(even: bool) -> list[tuple[str, str]]:
    """English prose from Python's reference documentation (pydoc_data.topics), indented blocks removed.

    Topics alternate between evaluation (even positions, sorted by name) and calibration (odd).
    """
    from pydoc_data.topics import topics

    names = sorted(topics)[0 if even else 1 :: 2]
    out = []
    for name in names:
        lines = [line for line in topics[name].splitlines() if not line.startswith((" ", "\t"))]
        out.append((f"pydoc_data.topics[{name!r}]", "\n".join(lines)))
    return out


def _join(name: str, parts: list[tuple[str, str]]) -> Text:
    return Text(name, "\n\n".join(text for _, text in parts), tuple(f"{src} {_sha(t)}" for src, t in parts))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]

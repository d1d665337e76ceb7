"""The held-out evaluation suite and the calibration mix, from Debian's documentation packages.

Every text comes from a Debian bookworm package fetched from deb.debian.org, pinned by version and
the .deb's sha256, and cached outside the clone (`EDGE_QWEN_TEXTS`, default ~/.cache/edge-qwen-texts),
or, for code, from Python's standard library as quant/texts.py takes it. Evaluation and calibration
never share a package file, and tests/test_suite.py checks that no 64-token window of one appears in
the other. Licenses: the packages' own (DFSG-free: GPL, GFDL, the licenses' texts are verbatim-copy).

Domains (each at least 16 chunks of 512 tokens, 4,080 scored tokens, with the project's protocol):

    code        Python's standard library (quant/texts.py's evaluation files) and Rust (the anyhow crate)
    en-tech     The Debian Reference, English
    en-legal    GPL-2, GPL-3 and MPL-1.1
    en-fiction  fortune-mod's literature, humorists' and people's quotations
    chat        The Debian FAQ's questions and answers as Qwen2.5 chat turns (its ChatML template)
    zh          The Debian Reference, Simplified Chinese
    es          The Debian Reference, Spanish
    de          The Debian Reference, German
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tarfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from edge_qwen.quant.texts import CALIBRATION_CODE_FILES, EVAL_CODE_FILES, Text, _join, _stdlib_file

MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Deb:
    """One Debian package file, pinned."""

    pool_path: str  # as `apt-cache show` prints it (Filename)
    sha256: str

    @property
    def name(self) -> str:
        return self.pool_path.rsplit("/", 1)[1]


REFERENCE = {
    lang: Deb(f"pool/main/d/debian-reference/debian-reference-{lang}_2.100_all.deb", sha)
    for lang, sha in {
        "en": "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
        "zh-cn": "6d2d8d9a646397e28b04cdff23d2e4374101ebf9be348e35961af62c8a2d0977",
        "es": "a59b68c96f83d3cf29a476c847aee38364764603ea62eee592791e0a843a269e",
        "de": "3b0ce65fd63e75ddf8eb07ca36293425135080e690a07e06a6ac8bc8040ef0aa",
    }.items()
}
FAQ_EN = Deb(
    "pool/main/d/debian-faq/debian-faq_11.1_all.deb",
    "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0",
)
FAQ_ZH = Deb(
    "pool/main/d/debian-faq/debian-faq-zh-cn_11.1_all.deb",
    "3545356b1aa04d87e91dd15e8406210cf5b4f476662e597897bcb42234591758",
)
FAQ_DE = Deb(
    "pool/main/d/debian-faq/debian-faq-de_11.1_all.deb",
    "e9a8d8234f4b182660d521f80f50cea87f797b4541005a3d64fab7777766f6de",
)
HANDBOOK = Deb(
    "pool/main/d/debian-handbook/debian-handbook_11.20220922_all.deb",
    "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
)
BASE_FILES = Deb(
    "pool/main/b/base-files/base-files_12.4+deb12u15_amd64.deb",
    "3eb1ea6d85488f488cc2a163b98ad640ef88cee4c79287cf14e361aaf6206f47",
)
FORTUNES = Deb(
    "pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
    "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
)
RUST_EVAL = Deb(
    "pool/main/r/rust-anyhow/librust-anyhow-dev_1.0.69-1_amd64.deb",
    "f877f024d95d8af3c3f62e2cf74e6ba5eb976a3cf27c920bda786cd32029b79d",
)
RUST_CALIBRATION = (
    Deb(
        "pool/main/r/rust-log/librust-log-dev_0.4.17-3_amd64.deb",
        "bd34d9fc5aaa80121cb1446f848ec99993f97c18f743bcb3f6c4824644c1d0cd",
    ),
    Deb(  # not semver: its crate shares an author, and so 80 windows of boilerplate, with anyhow
        "pool/main/r/rust-either/librust-either-dev_1.6.1-1_amd64.deb",
        "2121396d02d07eefa389929ae695533bfc996fd5f9022b6f1b9305bf7ba7a129",
    ),
)

DOMAINS = ("code", "en-tech", "en-legal", "en-fiction", "chat", "zh", "es", "de")


def texts_dir() -> Path:
    return Path(os.environ.get("EDGE_QWEN_TEXTS", Path.home() / ".cache" / "edge-qwen-texts"))


def fetch(deb: Deb) -> Path:
    """The .deb in the cache, downloaded once; its sha256 must be the pinned one."""
    path = texts_dir() / deb.name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        try:
            with urllib.request.urlopen(f"{MIRROR}/{deb.pool_path}", timeout=60) as r, tmp.open("wb") as f:
                f.write(r.read())
        except OSError as e:
            raise OSError(f"cannot download {deb.name} from {MIRROR} ({e}); the text suite needs it") from e
        tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != deb.sha256:
        raise ValueError(
            f"{path} has sha256 {digest[:16]}..., not the pinned {deb.sha256[:16]}...: delete it"
        )
    return path


def members(deb: Deb, pattern: str) -> list[tuple[str, bytes]]:
    """(path, bytes) of the files in the package's data archive whose path matches `pattern`, sorted."""
    raw = fetch(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb.name} is not a Debian package")
    pos, data = 8, None
    while pos < len(raw):  # ar: 60-byte headers, bodies padded to even lengths
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            data = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    if data is None:
        raise ValueError(f"{deb.name} has no data archive")
    regex, out = re.compile(pattern), []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            if info.isfile() and regex.search(info.name):
                f = tar.extractfile(info)
                assert f is not None
                out.append((info.name.lstrip("./"), f.read()))
    return sorted(out)


class _HtmlText(HTMLParser):
    """Visible text of an HTML page; block elements end lines; <h1>-<h3> are kept apart as headings."""

    BLOCKS = {"p", "div", "li", "tr", "pre", "br", "dt", "dd", "table", "ul", "ol"}
    HEADINGS = {"h1", "h2", "h3"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[tuple[str, str]] = [("text", "")]  # (kind, text): "heading" or "text"
        self.skip = 0
        self.pre = 0  # inside <pre>: line breaks are the text's own

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in self.HEADINGS:
            self.parts.append(("heading", ""))
        elif tag in self.BLOCKS:
            self.pre += tag == "pre"
            self._add("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip -= 1
        elif tag in self.HEADINGS:
            self.parts.append(("text", ""))
        elif tag in self.BLOCKS:
            self.pre -= tag == "pre"
            self._add("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self._add(data if self.pre else re.sub(r"\s+", " ", data))

    def _add(self, text: str) -> None:
        kind, old = self.parts[-1]
        self.parts[-1] = (kind, old + text)


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_text(html: bytes) -> str:
    parser = _HtmlText()
    parser.feed(html.decode("utf-8", errors="replace"))
    return _tidy("\n\n".join(text for _, text in parser.parts))


def faq_turns(html: bytes) -> list[tuple[str, str]]:
    """(question, answer) pairs of a Debian FAQ page: headings ending in '?', and the text after each."""
    parser = _HtmlText()
    parser.feed(html.decode("utf-8", errors="replace"))
    turns, parts = [], parser.parts
    for i, (kind, text) in enumerate(parts):
        question = re.sub(r"^[\d.]+\s*", "", " ".join(text.split()))
        if kind == "heading" and question.endswith(("?", "？")) and i + 1 < len(parts):
            answer = _tidy(parts[i + 1][1])
            if answer:
                turns.append((question, answer))
    return turns


def chat_transcript(turns: list[tuple[str, str]], per_conversation: int = 3) -> str:
    """Turns as Qwen2.5's ChatML conversations with its default system prompt, a few turns each."""
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    conversations = []
    for start in range(0, len(turns), per_conversation):
        out = [f"<|im_start|>system\n{system}<|im_end|>\n"]
        for question, answer in turns[start : start + per_conversation]:
            out.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
        conversations.append("".join(out))
    return "".join(conversations)


def _pages(deb: Deb, pattern: str, convert: Callable[[bytes], str] = html_text) -> list[tuple[str, str]]:
    return [(f"{deb.name}:{path}", convert(data)) for path, data in members(deb, pattern)]


def _plain(deb: Deb, pattern: str) -> list[tuple[str, str]]:
    return _pages(deb, pattern, lambda b: b.decode("utf-8", errors="replace"))


def _fortunes(deb: Deb, names: tuple[str, ...]) -> list[tuple[str, str]]:
    pattern = r"usr/share/games/fortunes/(" + "|".join(names) + r")$"
    return _pages(deb, pattern, lambda b: b.decode("utf-8", errors="replace").replace("\n%\n", "\n\n"))


def _faq_chat(deb: Deb, pattern: str) -> list[tuple[str, str]]:
    turns = [(path, faq_turns(data)) for path, data in members(deb, pattern)]
    return [(f"{deb.name}:{path} as chat", chat_transcript(t)) for path, t in turns if t]


REFERENCE_CHAPTERS = r"usr/share/debian-reference/ch0[1-4]\.{lang}\.html$"


def domain_text(name: str) -> Text:
    """One evaluation domain's text."""
    parts: list[tuple[str, str]]
    if name == "code":
        parts = [_stdlib_file(f) for f in EVAL_CODE_FILES] + _plain(RUST_EVAL, r"/src/.*\.rs$")
    elif name == "en-tech":
        parts = _pages(REFERENCE["en"], REFERENCE_CHAPTERS.format(lang="en"))
    elif name == "en-legal":
        parts = _plain(BASE_FILES, r"common-licenses/(GPL-2|GPL-3|MPL-1\.1)$")
    elif name == "en-fiction":
        parts = _fortunes(FORTUNES, ("literature", "humorists", "people"))
    elif name == "chat":
        parts = _faq_chat(FAQ_EN, r"FAQ/[a-z-]+\.en\.html$")
    elif name in ("zh", "es", "de"):
        lang = {"zh": "zh-cn", "es": "es", "de": "de"}[name]
        parts = _pages(REFERENCE[lang], REFERENCE_CHAPTERS.format(lang=re.escape(lang)))
    else:
        raise ValueError(f"unknown domain {name!r}: use one of {', '.join(DOMAINS)}")
    return _join(name, parts)


def calibration_parts() -> dict[str, list[tuple[str, str]]]:
    """The multi-domain calibration mix by domain: other packages (or other files) than the suite's."""
    return {name: list(parts) for name, parts in _calibration_parts().items()}


@functools.cache
def _calibration_parts() -> dict[str, tuple[tuple[str, str], ...]]:
    """calibration_parts, read from the packages once a process (seconds: hundreds of HTML pages)."""
    handbook = r"usr/share/doc/debian-handbook/html/{lang}/sect\.[a-z-]+\.html$"
    parts = {
        "code": [_stdlib_file(f) for f in CALIBRATION_CODE_FILES]
        + [part for deb in RUST_CALIBRATION for part in _plain(deb, r"/src/.*\.rs$")],
        "en-tech": _pages(HANDBOOK, handbook.format(lang="en-US")),
        # Not the GFDL (it shares 109 windows with the GPLs) nor MPL-2.0 (14 with MPL-1.1).
        "en-legal": _plain(BASE_FILES, r"common-licenses/(Apache-2\.0|Artistic|CC0-1\.0|BSD)$"),
        "en-fiction": _fortunes(FORTUNES, ("wisdom", "definitions", "songs-poems")),
        # The translated FAQs leave some chapters in English, the evaluation's chat text: not those.
        "chat": _faq_chat(FAQ_DE, r"FAQ/de/(?!choosing|ftparchives|pkg-basics)[a-z-]+\.de\.html$"),
        "zh": _faq_chat(FAQ_ZH, r"FAQ/zh-cn/(?!choosing|pkg-basics)[a-z-]+\.zh-cn\.html$"),
        "es": _pages(HANDBOOK, handbook.format(lang="es-ES")),
        "de": _pages(HANDBOOK, handbook.format(lang="de-DE")),
    }
    return {name: tuple(p) for name, p in parts.items()}


# Shares of the calibration mix by domain. Code gets three: one of eight left it 32% worse than the
# code-heavy built-in text on code (docs/quantization.md), and code is what the Coder models are for.
CALIBRATION_SHARES = {
    "code": 3,
    "en-tech": 1,
    "en-legal": 1,
    "en-fiction": 1,
    "chat": 1,
    "zh": 1,
    "es": 1,
    "de": 1,
}
# 32 windows of 512 tokens: what one calibration pass takes (export/calibrate.py CALIBRATION_CHUNKS).
CALIBRATION_TOKENS = 32 * 512


def calibration_text(
    count_tokens: Callable[[str], int],
    total_tokens: int = CALIBRATION_TOKENS,
    shares: Mapping[str, int] = CALIBRATION_SHARES,
    pieces: int = 4,
) -> Text:
    """The calibration mix as one text, in DOMAINS order: each domain's share of `total_tokens` (by
    `count_tokens`, the model's tokenizer) in runs spread over its texts (spread_runs)."""
    parts = []
    whole = sum(shares.values())
    for name, domain_parts in calibration_parts().items():
        budget = total_tokens * shares[name] // whole
        runs = spread_runs("\n\n".join(t for _, t in domain_parts), budget, pieces, count_tokens)
        sources = ", ".join(src for src, _ in domain_parts)
        parts.append(
            (f"{name}: {pieces} runs of {budget // pieces} tokens spread over {sources}", "\n\n".join(runs))
        )
    return _join("suite-calibration", parts)


def spread_runs(text: str, tokens: int, pieces: int, count_tokens: Callable[[str], int]) -> list[str]:
    """`pieces` runs of text, `tokens` in all, starting at evenly spaced points of it, so that its
    first file or chapter does not stand for the whole of it."""
    return [_prefix(text[i * len(text) // pieces :], tokens // pieces, count_tokens) for i in range(pieces)]


def _prefix(text: str, tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of text within `tokens` tokens."""
    low, high = (
        0,
        min(len(text), 64 * tokens),
    )  # a bounded search: no text here averages 64 characters a token
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count_tokens(text[:mid]) <= tokens else (low, mid - 1)
    return text[:low]

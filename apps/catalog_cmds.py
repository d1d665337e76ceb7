"""The `pull` and `models` commands: thin layers over edge_qwen.hub.catalog."""

from __future__ import annotations

import click

from edge_qwen.hub import catalog


@click.command()
@click.argument("name")
@click.option("--precision", type=click.Choice(catalog.PRECISIONS), default="int4", show_default=True)
@click.option(
    "--force",
    is_flag=True,
    help="Export again even when the package is cached (a download is reused when its checksum verifies).",
)
@click.option(
    "--target-cpu",
    type=click.Choice(["auto", "x86", "a76", "a72"]),
    default="auto",
    show_default=True,
    help="The CPU the package is for (see `edge-qwen export --help`).",
)
@click.option(
    "--recipe",
    type=click.Choice(catalog.RECIPES),
    default="default",
    show_default=True,
    help="int4: exact carries a GGUF source's own blocks over (seconds); calibrated is GPTQ on a "
    "multi-domain text mix with int8 edge layers (minutes; smaller, faster decode); small has no int8 "
    "matrix. default: exact from a GGUF, calibrated from a Hugging Face folder, small on a Raspberry "
    "Pi 4 (a72) (docs/quantization.md). Cached as NAME-int4, or NAME-int4-RECIPE.",
)
def pull(name: str, precision: str, force: bool, target_cpu: str, recipe: str) -> None:
    """Fetch catalog model NAME, export it with a recipe and cache it; prints its folder."""
    click.echo(catalog.pull(name, precision, force=force, target_cpu=target_cpu, recipe=recipe))


@click.command()
def models() -> None:
    """List the catalog and the packages cached under EDGE_QWEN_HOME."""
    known = catalog.load_catalog()
    cached = catalog.cached_packages()
    rows = [
        ("*" if e.default else " ", e.name, e.size_class, _cached(e.name, cached), e.description)
        for e in known.entries
    ]
    others = sorted({p.name for p in cached} - set(known.names))  # e.g. left by an older catalog
    rows += [(" ", name, "?", _cached(name, cached), "(not in the catalog)") for name in others]
    name_width = max(len(r[1]) for r in rows)
    cached_width = max(len(r[3]) for r in [*rows, ("", "", "", "CACHED", "")])
    click.echo(f"  {'NAME':<{name_width}}  {'SIZE':<5} {'CACHED':<{cached_width}}  DESCRIPTION")
    for marker, name, size_class, cached_text, description in rows:
        click.echo(
            f"{marker} {name:<{name_width}}  {size_class:<5} {cached_text:<{cached_width}}  {description}"
        )
    click.echo(f"\n* default model; cache: {catalog.home()}")


def _cached(name: str, cached: list[catalog.CachedPackage]) -> str:
    found = [
        f"{p.precision}{'' if p.recipe == 'default' else '-' + p.recipe} {p.size / 1e6:.0f} MB"
        for p in cached
        if p.name == name
    ]
    return ", ".join(found) or "-"

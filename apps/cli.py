"""The `edge-qwen` command line: parse, call the library, print."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from edge_qwen.errors import EdgeQwenError

# Errors a user can act on become one line on stderr and exit 1; anything else is a bug and keeps
# its traceback.
USER_ERRORS = (EdgeQwenError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-qwen")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def cli(verbose: bool) -> None:
    """Run and export small Qwen2.5 models on edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@cli.command()
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--max-context",
    type=int,
    default=None,
    help="Context of the package [default: 4096, or less if the model's own maximum is smaller].",
)
@click.option(
    "--logits",
    type=click.Choice(["last", "all"]),
    default="last",
    show_default=True,
    help="'all' keeps every position's logits, for evaluation.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(
    source: str, out: Path, precision: str, max_context: int | None, logits: str, overwrite: bool
) -> None:
    """Export a Qwen2 checkpoint (Hugging Face folder) to a model package OUT."""
    try:
        from edge_qwen.export.options import ExportOptions
        from edge_qwen.export.readers import read_checkpoint
        from edge_qwen.export.writer import write_package
    except ImportError as e:
        raise click.ClickException(
            f"exporting needs the export extra ({e.name} is missing): pip install 'edge-qwen[export]'"
        ) from None
    opts = ExportOptions(precision=precision, max_context=max_context, logits=logits)
    ckpt = read_checkpoint(source)
    write_package(ckpt, out, opts, overwrite=overwrite)
    click.echo(f"exported {out} ({_size(out) / 1e6:.0f} MB)", err=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option(
    "--chat/--raw",
    default=True,
    show_default=True,
    help="Wrap PROMPT in the model's chat template, or feed it as is.",
)
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores].")
def generate(
    model: Path,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    chat: bool,
    system: str | None,
    threads: int | None,
) -> None:
    """Generate a completion of PROMPT; prints only the completion to stdout."""
    import edge_qwen

    m = edge_qwen.load(model, threads=threads)
    for piece in m.stream(
        prompt,
        max_tokens=max_tokens,
        chat=chat,
        system=system,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    ):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    logging.getLogger(__name__).info(
        "%d prompt tokens, %d generated, prefill %.2f s, decode %.1f tok/s",
        piece.prompt_tokens,
        piece.generated_tokens,
        piece.prefill_seconds,
        piece.decode_tokens_per_second,
    )


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(model: Path, as_json: bool) -> None:
    """Show a package's manifest, file sizes and operator counts."""
    from edge_qwen.package import read_manifest

    manifest = read_manifest(model)
    if as_json:
        click.echo(json.dumps(manifest.raw, indent=2))
        return
    cfg = manifest.config
    raw = manifest.raw
    click.echo(f"package     {model}")
    click.echo(
        f"model       Qwen2 {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (q/kv), ffn {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings"
    )
    click.echo(f"precision   {manifest.precision}")
    click.echo(f"context     {manifest.max_context} tokens, logits: {manifest.logits}")
    click.echo(f"stop ids    {', '.join(map(str, manifest.stop_token_ids))}")
    click.echo(f"source      {raw['source']['path']} (sha256 {raw['source']['sha256'][:16]}...)")
    click.echo(f"tool        {raw.get('tool', '?')}")
    click.echo("files")
    for name, meta in manifest.files.items():
        click.echo(f"  {name:<24} {meta['size'] / 1e6:>10.2f} MB")
    click.echo(f"  {'total':<24} {_size(model) / 1e6:>10.2f} MB")
    click.echo("operators")
    for op, count in sorted(raw.get("op_counts", {}).items(), key=lambda kv: -kv[1]):
        click.echo(f"  {op:<34} {count:>5}")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def main() -> None:
    """Entry point: every error, usage errors included, is one line on stderr."""
    try:
        code = cli.main(prog_name="edge-qwen", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"Error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

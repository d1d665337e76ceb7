"""The `edge-qwen` command line: parse, call the library, print."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from edge_qwen.apps import catalog_cmds, npu_cmds
from edge_qwen.apps.bench_cmd import bench
from edge_qwen.apps.chat import chat
from edge_qwen.apps.quality_cmds import evaluate_cmd, export
from edge_qwen.apps.server_cmd import serve
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
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True, help="0 disables.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 disables.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop at this text (not printed); repeatable.")
@click.option(
    "--chat/--raw",
    default=True,
    show_default=True,
    help="Wrap PROMPT in the model's chat template, or feed it as is.",
)
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("--json", "json_object", is_flag=True, help="Constrain the output to a JSON object.")
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Constrain the output to JSON valid against this JSON schema file.",
)
@click.option("--regex", default=None, help="Constrain the output to match this regular expression.")
@click.option("--provider", default="cpu", show_default=True, help="cpu, xnnpack, qnn, nnapi, coreml.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores].")
def generate(
    model: Path,
    prompt: str,
    chat: bool,
    system: str | None,
    json_object: bool,
    json_schema: Path | None,
    provider: str,
    threads: int | None,
    **options: Any,
) -> None:
    """Generate a completion of PROMPT; prints only the completion to stdout."""
    import edge_qwen
    from edge_qwen.apps.structured_opts import response_format

    options["response_format"] = response_format(json_object, json_schema)
    config = edge_qwen.GenerationConfig(**options)  # bad values fail before the model loads
    m = edge_qwen.load(model, provider=provider, threads=threads)
    for piece in m.stream(prompt, config, chat=chat, system=system):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    logging.getLogger(__name__).info(
        "%d prompt tokens, %d generated, prefill %.2f s, decode %.1f tok/s, finish: %s",
        piece.prompt_tokens,
        piece.generated_tokens,
        piece.prefill_seconds,
        piece.decode_tokens_per_second,
        piece.finish_reason,
    )


@cli.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option(
    "--providers", is_flag=True, help="List the execution providers this machine's onnxruntime offers."
)
def info(model: Path | None, as_json: bool, providers: bool) -> None:
    """Show a package's manifest, file sizes and operator counts, and/or the execution providers."""
    if model is None and not providers:
        raise click.UsageError("MODEL is required (or pass --providers)")
    if model is not None and not model.exists():
        model = _cached(str(model))
    if as_json:
        from edge_qwen.package import read_manifest

        package = read_manifest(model).raw if model is not None else None
        found = _providers_info() if providers else None
        out = (
            package if not providers else found if model is None else {"package": package, "providers": found}
        )
        click.echo(json.dumps(out, indent=2))
        return
    if model is not None:
        _echo_package(model)
    if providers:
        _echo_providers()


def _cached(name: str) -> Path:
    """A catalog name's cached INT4 package: `info` shows what is there, and never pulls."""
    from edge_qwen.hub import catalog
    from edge_qwen.package import MANIFEST

    entry = catalog.load_catalog().find(name)
    if entry is None:
        raise click.ClickException(f"{name} is neither a package folder nor a catalog name")
    path = catalog.package_dir(entry.name, "int4")
    if not (path / MANIFEST).is_file():
        raise click.ClickException(f"{entry.name} is not pulled yet: edge-qwen pull {entry.name}")
    return path


def _prepacked(model: Path) -> str:
    """Where this machine keeps the package's weights as ONNX Runtime packs them, or when it will."""
    from edge_qwen import prepacked

    folder = prepacked.copy_folder(model)
    if not prepacked.is_written(model):
        return f"none yet on this machine: the first load writes it ({folder})"
    return f"{folder} ({_size(folder) / 1e6:.0f} MB)"


def _echo_package(model: Path) -> None:
    from edge_qwen.package import read_manifest

    manifest = read_manifest(model)
    cfg = manifest.config
    raw = manifest.raw
    click.echo(f"package     {model}")
    click.echo(
        f"model       Qwen2 {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (q/kv), ffn {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings"
    )
    click.echo(f"precision   {manifest.precision}")
    quantization = raw.get("quantization") or {}
    if quantization.get("recipe"):
        parts = {k: v for k, v in quantization["recipe"].items() if v}
        click.echo(f"recipe      {'; '.join(f'{k}: {v}' for k, v in parts.items())}")
        click.echo(f"target cpu  {quantization.get('target_cpu', 'any (not recorded)')}")
    click.echo(f"context     {manifest.max_context} tokens, logits: {manifest.logits}")
    click.echo(f"stop ids    {', '.join(map(str, manifest.stop_token_ids))}")
    if "source" in raw:  # onnxruntime-genai's folders do not say
        click.echo(f"source      {raw['source']['path']} (sha256 {raw['source']['sha256'][:16]}...)")
    others = raw.get("runs_in") or {"other runtimes": "not recorded (re-export to record them)"}
    click.echo(f"runs in     edge-qwen; {'; '.join(f'{k}: {v}' for k, v in others.items())}")
    click.echo(f"tool        {raw.get('tool', '?')}")
    click.echo("files")
    for name, meta in manifest.files.items():
        click.echo(f"  {name:<24} {meta['size'] / 1e6:>10.2f} MB")
    click.echo(f"  {'total':<24} {_size(model) / 1e6:>10.2f} MB")
    click.echo(f"prepacked   {_prepacked(model)}")
    click.echo("operators")
    for op, count in sorted(raw.get("op_counts", {}).items(), key=lambda kv: -kv[1]):
        click.echo(f"  {op:<34} {count:>5}")


def _providers_info() -> dict[str, Any]:
    import onnxruntime as ort

    from edge_qwen.apps.kernels import kernel_paths
    from edge_qwen.apps.machine import machine_info
    from edge_qwen.export.targets import this_cpu
    from edge_qwen.providers import PROVIDERS, available_providers, physical_cores, short_name

    available = available_providers()
    machine = machine_info()
    return {
        "onnxruntime": ort.__version__,
        "available": [{"name": name, "short_name": short_name(name)} for name in available],
        "missing": [short for short, name in PROVIDERS.items() if name not in available],
        "default_threads": physical_cores(),
        "cpu": {"name": machine.cpu, "arch": machine.arch, "features": list(machine.features)},
        "target_cpu": this_cpu(),
        "matmul_nbits": {p.kind: {"decode": p.decode, "prefill": p.prefill} for p in kernel_paths()},
    }


def _echo_providers() -> None:
    from edge_qwen.apps.kernels import KernelPath

    found = _providers_info()
    click.echo(
        f"providers   onnxruntime {found['onnxruntime']}, {found['default_threads']} threads by default"
    )
    for provider in found["available"]:
        click.echo(f"  {provider['short_name'] or '-':<10} {provider['name']}")
    if found["missing"]:
        click.echo(f"  not in this onnxruntime: {', '.join(found['missing'])} (they fall back to cpu)")
    cpu = found["cpu"]
    click.echo(f"cpu         {cpu['name']} ({cpu['arch']}), export target {found['target_cpu']}")
    click.echo(f"  features  {' '.join(cpu['features']) or 'none of those the kernels use'}")
    click.echo("MatMulNBits kernels on this CPU, by weight kind (found by running each):")
    for kind, path in found["matmul_nbits"].items():
        click.echo(f"  {kind:<16} {KernelPath(kind, **path).describe()}")


cli.add_command(chat)
cli.add_command(export)
cli.add_command(catalog_cmds.pull)
cli.add_command(catalog_cmds.models)
cli.add_command(evaluate_cmd)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(npu_cmds.check)


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


if __name__ == "__main__":  # python -m edge_qwen.apps.cli: the same as the command
    main()

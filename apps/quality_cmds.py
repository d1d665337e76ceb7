"""The `export` and `eval` commands: thin layers over edge_qwen.export and apps/evaluate.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

EXPORT_EXTRA_HINT = "exporting needs the export extra ({} is missing): pip install 'edge-qwen[export]'"


@click.command()
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int4", show_default=True
)
@click.option(
    "--block-size",
    type=click.Choice(["32", "64", "128"]),
    default=None,
    help="Quantization block size (int4/int8) [default: the precision's recipe].",
)
@click.option(
    "--block-size-for",
    "block_sizes",
    multiple=True,
    metavar="WEIGHT=SIZE",
    help="A block size for one kind of weight (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head), "
    "repeatable [default: the precision's recipe; --block-size alone: that size for all].",
)
@click.option(
    "--algo",
    type=click.Choice(["rtn", "kquant", "imatrix", "gptq", "gguf"]),
    default=None,
    help="rtn: round to nearest; kquant: least-squares scale search; imatrix: kquant weighted by "
    "activations of a built-in calibration text; gptq: error compensation through their Hessian; "
    "gguf: a .gguf source's own quantized blocks, exactly [default: the precision's recipe, see "
    "docs/quantization.md].",
)
@click.option(
    "--recipe",
    type=click.Choice(["default", "calibrated", "small", "exact"]),
    default="default",
    show_default=True,
    help="int4: calibrated is GPTQ on a multi-domain text mix, with int8 edge layers (minutes); small "
    "has no int8 matrix, 9%% smaller with more KL divergence; exact (a .gguf source) carries the GGUF's "
    "own blocks over (seconds). default: exact for a quantized .gguf, small for --target-cpu a72, else "
    "calibrated (docs/quantization.md). The options below override the recipe's.",
)
@click.option(
    "--symmetric/--asymmetric",
    default=None,
    help="Symmetric weights (no zero points): 2% smaller, 40-50% more KL divergence, and the same "
    "kernels as asymmetric ones in onnxruntime 1.32 (docs/arm64.md) [default: the precision's recipe].",
)
@click.option(
    "--embeddings",
    type=click.Choice(["int4", "int8", "fp16", "fp32"]),
    default=None,
    help="Embedding table precision [default: as the body; tied checkpoints: as lm_head].",
)
@click.option(
    "--lm-head",
    type=click.Choice(["int4", "int8", "fp16", "fp32"]),
    default=None,
    help="lm_head precision [default: the precision's recipe].",
)
@click.option(
    "--mixed/--no-mixed",
    default=None,
    help="int4: keep qkv and down_proj of the first and last sixth of the layers at int8 "
    "[default: no, the INT4 recipe has no int8 tensors].",
)
@click.option(
    "--max-context",
    type=int,
    default=None,
    help="Context of the package [default: 4096, or less if the model's own maximum is smaller].",
)
@click.option(
    "--logits",
    type=click.Choice(["last", "all"]),
    default="all",
    show_default=True,
    help="The graph's default logits: every position (what onnxruntime-genai and optimum expect) or "
    "the last (edge-qwen only). edge-qwen's runtime computes the last position's alone either way.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="MatMulNBits' compute: 4 rounds activations to int8 (the fast path); 0 or 1 computes in "
    "float32, the weights' exact products: slower, and for 8-bit matrices (int8 layers, a GGUF's "
    "5-8-bit blocks) ONNX Runtime dequantizes the whole matrix at every call [default: 4].",
)
@click.option(
    "--calibration",
    type=click.Choice(["auto", "builtin", "suite"]),
    default=None,
    help="Calibration text of imatrix and gptq: suite (code, English, Chinese, Spanish, German and "
    "chat from Debian's documentation, downloaded once), builtin (Python's code and docs), or auto "
    "(suite, or builtin with a warning when its texts cannot be had) [default: the precision's recipe].",
)
@click.option(
    "--target-cpu",
    type=click.Choice(["auto", "x86", "a76", "a72"]),
    default="auto",
    show_default=True,
    help="The CPU the package is for: auto is this machine's; a72 (Raspberry Pi 4, no dot products) "
    "refuses int8 weights, which run a float32 fallback there (docs/arm64.md).",
)
@click.option(
    "--target",
    type=click.Choice(["cpu", "npu"]),
    default="cpu",
    show_default=True,
    help="cpu: the fused graph; npu: static QDQ parts for Qualcomm HTP through the QNN execution "
    "provider, --precision int8 (W8A16), int4 (W4A16) or fp32 (docs/npu.md).",
)
@click.option(
    "--prefill-len", type=click.IntRange(min=2), default=None, help="npu: tokens per prefill run [128]."
)
@click.option(
    "--context",
    type=click.Choice(["1024", "2048", "4096"]),
    default=None,
    help="npu: the fixed window [1024].",
)
@click.option(
    "--force",
    "--overwrite",
    "overwrite",
    is_flag=True,
    help="Replace OUT if it exists; the new package takes its place only once complete.",
)
def export(
    source: str,
    out: Path,
    precision: str,
    block_size: str | None,
    block_sizes: tuple[str, ...],
    algo: str | None,
    recipe: str,
    symmetric: bool | None,
    embeddings: str | None,
    lm_head: str | None,
    mixed: bool | None,
    max_context: int | None,
    logits: str,
    accuracy_level: int | None,
    calibration: str | None,
    target_cpu: str,
    target: str,
    prefill_len: int | None,
    context: str | None,
    overwrite: bool,
) -> None:
    """Export a Qwen2 checkpoint (Hugging Face folder or .gguf file) to a model package OUT."""
    if target == "npu":
        from edge_qwen.apps.npu_cmds import export_npu

        export_npu(source, out, precision, prefill_len or 128, int(context or 1024), overwrite)
        return
    if prefill_len is not None or context is not None:
        raise click.UsageError(
            "--prefill-len and --context are for --target npu (the CPU's is --max-context)"
        )
    try:
        from edge_qwen.export.options import recipe_options
        from edge_qwen.export.readers import read_checkpoint
        from edge_qwen.export.writer import write_package
    except ImportError as e:
        raise click.ClickException(EXPORT_EXTRA_HINT.format(e.name)) from None
    given = {
        "block_size": None if block_size is None else int(block_size),
        "block_sizes": _block_sizes(block_sizes) if block_sizes else (() if block_size else None),
        "algo": algo,
        "symmetric": symmetric,
        "embeddings": embeddings,
        "lm_head": lm_head,
        "mixed": mixed,
        "calibration": calibration,
        "accuracy_level": accuracy_level,
    }
    # A GGUF's default is its exact import, unless an option shapes another recipe.
    gguf = Path(source).suffix.lower() == ".gguf" and all(v is None for v in given.values())
    opts = replace(
        recipe_options(recipe, precision, target_cpu, gguf),
        max_context=max_context,
        logits=logits,
        target_cpu=target_cpu,
        **{k: v for k, v in given.items() if v is not None},
    )
    ckpt = read_checkpoint(source)
    write_package(ckpt, out, opts, overwrite=overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    click.echo(f"exported {out} ({size / 1e6:.0f} MB)", err=True)


def _block_sizes(specs: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    pairs = []
    for spec in specs:
        weight, _, size = spec.partition("=")
        if not size.isdigit():
            raise click.BadParameter(f"expected WEIGHT=SIZE such as gate_up_proj=64, got {spec!r}")
        pairs.append((weight, int(size)))
    return tuple(pairs)


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    required=True,
    type=click.Path(path_type=Path),
    help="The package to compare against (e.g. an fp32 export of the same checkpoint).",
)
@click.option(
    "--text",
    "text_spec",
    default="code",
    show_default=True,
    help="'code' or 'prose' (built-in, from Python's standard library), a UTF-8 file, 'suite' (every "
    "domain of the held-out suite, docs/quality.md) or some of them: suite:zh,es (code, en-tech, "
    "en-legal, en-fiction, chat, zh, es, de).",
)
@click.option(
    "--ctx", type=int, default=512, show_default=True, help="Tokens per chunk; the second half is scored."
)
@click.option(
    "--chunks", type=click.IntRange(min=1), default=16, show_default=True, help="At most this many."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate_cmd(model: Path, reference: Path, text_spec: str, ctx: int, chunks: int, as_json: bool) -> None:
    """KL divergence, top-1 agreement and perplexity of MODEL against --reference."""
    from edge_qwen.apps.evaluate import evaluate, evaluate_suite
    from edge_qwen.quant.suite import DOMAINS

    if text_spec == "suite" or text_spec.startswith("suite:"):
        domains = DOMAINS if text_spec == "suite" else tuple(text_spec.split(":", 1)[1].split(","))
        found = evaluate_suite(model, reference, domains, ctx, chunks)
        if as_json:
            click.echo(json.dumps(found, indent=2))
            return
        click.echo(f"{'domain':<12} {'tokens':>7} {'mean KLD':>9} {'top-1':>7} {'ppl':>8}")
        for name, r in [*found["domains"].items(), ("macro", {**found["macro"], "tokens_scored": None})]:
            tokens = "" if r["tokens_scored"] is None else r["tokens_scored"]
            click.echo(
                f"{name:<12} {tokens:>7} {r['mean_kld']:>9.5f} {100 * r['top1_agreement']:>6.2f}% "
                f"{100 * (r['ppl_ratio'] - 1):>+7.2f}%"
            )
        return
    report = evaluate(model, reference, text_spec, ctx, chunks)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"text            {report['text']['name']} ({report['chunks']} chunks of {ctx} tokens)")
    click.echo(f"tokens scored   {report['tokens_scored']}")
    click.echo(f"mean KLD        {report['mean_kld']:.5f}")
    click.echo(f"p99 KLD         {report['p99_kld']:.5f}")
    click.echo(f"top-1 agreement {100 * report['top1_agreement']:.2f}%")
    click.echo(
        f"perplexity      {report['ppl_model']:.4f} vs reference {report['ppl_reference']:.4f} "
        f"({100 * (report['ppl_ratio'] - 1):+.2f}%)"
    )

"""`edge-qwen check` (a package's files, or its NPU readiness report) and `export --target npu`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--target",
    type=click.Choice(["files", "npu"]),
    default="files",
    show_default=True,
    help="files: every file against its size and sha256 in the manifest; npu: what Qualcomm HTP through "
    "the QNN execution provider would take of each graph (docs/npu.md).",
)
@click.option(
    "--mobile/--no-mobile", default=True, help="npu: also run onnxruntime's mobile usability check."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(model: Path, target: str, mobile: bool, as_json: bool) -> None:
    """Check MODEL: its files, or (--target npu) whether an NPU can run it. Exit 1 when not ready."""
    from edge_qwen.package import read_manifest

    manifest = read_manifest(model, verify_hashes=True)
    if target == "files":
        click.echo(f"{model}: {len(manifest.files)} files match the manifest")
        return
    from edge_qwen.apps.npu_check import check_graph, mobile_usability, package_graphs

    parts = {name: [check_graph(p) for p in paths] for name, paths in package_graphs(model).items()}
    first = next(iter(package_graphs(model).values()))[-1]
    usability = mobile_usability(first) if mobile else []
    reasons = _reasons(manifest.raw, parts)
    if as_json:
        report: dict[str, Any] = {
            "ready": not reasons,
            "reasons": reasons,
            "parts": {name: [r.to_dict() for r in reports] for name, reports in parts.items()},
            "mobile_usability": {first.name: usability},
        }
        click.echo(json.dumps(report, indent=2))
    else:
        _echo(model, manifest.raw, parts, first.name, usability, reasons)
    if reasons:
        raise click.exceptions.Exit(1)


def _reasons(raw: dict[str, Any], parts: dict[str, list[Any]]) -> list[str]:
    reasons = []
    if raw.get("kind") != "npu":
        reasons.append("a CPU package: export one with --target npu")
    for reports in parts.values():
        for r in reports:
            if r.unsupported:
                ops = ", ".join(f"{op} x{n}" for op, n in r.unsupported.most_common())
                reasons.append(f"{r.file}: ops without a QNN builder, which fall back to the CPU: {ops}")
            if r.dynamic:
                reasons.append(
                    f"{r.file}: {len(r.dynamic)} inputs/outputs of dynamic shape, e.g. {r.dynamic[0]}"
                )
            if not r.qdq_types:
                reasons.append(
                    f"{r.file}: not quantized (HTP runs QDQ graphs): export with --precision int8 or int4"
                )
            elif r.outside_qdq:
                ops = ", ".join(f"{op} x{n}" for op, n in r.outside_qdq.most_common())
                reasons.append(f"{r.file}: ops outside QDQ: {ops}")
    return reasons


def _echo(
    model: Path,
    raw: dict[str, Any],
    parts: dict[str, list[Any]],
    first: str,
    usability: list[str],
    reasons: list[str],
) -> None:
    npu = raw.get("npu") or {}
    kind = "npu" if raw.get("kind") == "npu" else "cpu"
    window = f", prefill {npu['prefill_len']}, context {npu['context']}" if npu else ""
    click.echo(f"package     {model} ({kind} package, {raw['precision']}{window})")
    for name, reports in parts.items():
        part = next((p for p in [*npu.get("parts", []), npu.get("head", {})] if p.get("name") == name), {})
        layers = part.get("layers")
        span = f"layers {layers[0]}-{layers[-1]}" if layers else ("lm_head" if part else "whole model")
        click.echo(f"{name:<8} {span:<13} weights {reports[0].weight_bytes / 1e6:.1f} MB")
        for r in reports:
            shapes = "static shapes" if not r.dynamic else f"{len(r.dynamic)} dynamic inputs/outputs"
            unsupported = ", ".join(f"{op} x{n}" for op, n in r.unsupported.most_common()) or "none"
            click.echo(f"  {r.file}: {r.nodes} nodes, {len(r.ops)} op types, {shapes}")
            click.echo(f"    ops without a QNN builder (CPU fallback): {unsupported}")
            qdq = ", ".join(f"{k} x{n}" for k, n in sorted(r.qdq_types.items())) or "none"
            click.echo(f"    QDQ tensors: {qdq}")
            outside = ", ".join(f"{op} x{n}" for op, n in r.outside_qdq.most_common()) or "none"
            click.echo(f"    ops outside QDQ: {outside}")
    if npu:
        click.echo(f"cpu         {npu['embeddings']} (the embedding lookup) and sampling, by design")
    if usability:
        click.echo(f"onnxruntime check_onnx_model_mobile_usability on {first}:")
        for line in usability:
            click.echo(f"  {line}")
    if reasons:
        click.echo("verdict     NOT READY for QNN HTP:")
        for reason in reasons:
            click.echo(f"  - {reason}")
    else:
        click.echo(
            "verdict     READY for QNN HTP by the op allowlist: every part static, standard ops with QNN "
            "builders, QDQ throughout (unproven here: QNN's compiler on each part, and speed)"
        )


NPU_PRECISIONS = {"int8": "w8a16", "int4": "w4a16", "fp32": "fp32"}


def export_npu(
    source: str, out: Path, precision: str, prefill_len: int, context: int, overwrite: bool
) -> None:
    """`export --target npu`: static QDQ parts for QNN HTP (weights int8 or int4, activations uint16)."""
    if precision not in NPU_PRECISIONS:
        raise click.UsageError(
            f"--target npu exports int8 (W8A16), int4 (W4A16) or fp32 (unquantized), not {precision}"
        )
    from edge_qwen.export.npu_package import NpuOptions, write_npu_package
    from edge_qwen.export.readers import read_checkpoint

    opts = NpuOptions(precision=NPU_PRECISIONS[precision], prefill_len=prefill_len, context=context)
    write_npu_package(read_checkpoint(source), out, opts, overwrite=overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    click.echo(
        f"exported {out} ({size / 1e6:.0f} MB, {opts.precision}, prefill {prefill_len}, context {context})",
        err=True,
    )

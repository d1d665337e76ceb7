"""Structured output on a real model: unconstrained vs constrained JSON extraction and tool calls.

    nice -n 10 python bench/structured.py [PACKAGE] [--limit N] [--out bench/results/structured.json]

Each case of bench/data/structured.json (extraction into a schema with enums, patterns, bounds and
nested arrays; or picking a tool and filling its arguments) runs twice with greedy decoding, on the
same prompt: unconstrained, then constrained (response_format json_schema, or tool_choice
"required"); the order alternates between cases so that load on the machine falls on both. For each
output: does it parse (json.loads of the whole answer, or a parsed tool call), does it validate
against the schema (jsonschema), and do the fields match the expected values exactly (strings
compared case-insensitively). The constraint's own cost per token (mask, masking the logits,
advancing the matcher) is timed by replaying each constrained output through a fresh matcher,
and set against the unconstrained runs' decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

import edge_qwen
from edge_qwen.constraints import compile_constraint, grammar_for
from edge_qwen.generation import GenerationConfig
from edge_qwen.sampling import apply_mask

DATA = Path(__file__).parent / "data" / "structured.json"
DEFAULT = Path.home() / ".cache" / "edge-qwen-bench" / "compare" / "qwen2.5-coder-0.5b-instruct-int4"
SYSTEM = (
    "Extract the fields from the user's text. Answer with one JSON object that follows this JSON "
    "schema, and nothing else:\n{schema}"
)
MAX_TOKENS = 200


def same(expected: Any, got: Any) -> bool:
    """Exact match of expected values: strings case-insensitively, numbers by value, lists in order."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and all(k in got and same(v, got[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(same, expected, got))
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().casefold() == expected.casefold()
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    return isinstance(got, (int, float)) and got == expected


def extraction(
    model: edge_qwen.Model, case: dict[str, Any], schema: dict[str, Any], constrained: bool
) -> dict:
    config = GenerationConfig(
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_schema", "json_schema": {"name": case["schema"], "schema": schema}}
        if constrained
        else None,
    )
    system = SYSTEM.format(schema=json.dumps(schema))
    pieces = list(model.stream(case["text"], config, system=system))
    text = "".join(p.text for p in pieces)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _row(pieces, parses=False, valid=False, exact=False, grammar=None)
    valid = _valid(data, schema)
    grammar = grammar_for(config) if constrained else None
    return _row(
        pieces, parses=True, valid=valid, exact=valid and same(case["expected"], data), grammar=grammar
    )


def tool_call(model: edge_qwen.Model, case: dict[str, Any], tools: list[dict], constrained: bool) -> dict:
    config = GenerationConfig(max_tokens=MAX_TOKENS, tool_choice="required" if constrained else "auto")
    chat = model.chat(tools=tools, max_context=1024)
    pieces = list(chat.stream(case["text"], config))
    calls = pieces[-1].tool_calls
    grammar = grammar_for(config, tools, model.tokenizer) if constrained else None
    if not calls:
        return _row(pieces, parses=False, valid=False, exact=False, grammar=grammar)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    arguments = json.loads(calls[0].arguments)
    valid = calls[0].name in schemas and _valid(arguments, schemas[calls[0].name])
    exact = valid and calls[0].name == case["tool"] and same(case["expected"], arguments)
    return _row(pieces, parses=True, valid=valid, exact=exact, grammar=grammar)


def _valid(data: Any, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError:
        return False
    return True


def _row(pieces: list, parses: bool, valid: bool, exact: bool, grammar: str | None) -> dict:
    last = pieces[-1]
    return {
        "parses": parses,
        "valid": valid,
        "exact": exact,
        "tokens": [p.token_id for p in pieces],
        "generated": last.generated_tokens,
        "decode_ms_per_token": 1e3 * last.decode_seconds / max(last.generated_tokens - 1, 1),
        "finish": last.finish_reason,
        "grammar": grammar,
    }


def mask_cost_ms(
    model: edge_qwen.Model, grammar: str, tokens: list[int], rng: np.random.Generator
) -> list[float]:
    """Per-token time of the constraint alone (mask, masking a logits row, advancing), replayed."""
    constraint = compile_constraint(model, grammar)
    logits = rng.normal(0, 2, model.config.vocab_size).astype(np.float32)
    times = []
    for token in tokens:
        start = time.perf_counter()
        apply_mask(logits, constraint.allowed())
        constraint.advance(token)
        times.append(1e3 * (time.perf_counter() - start))
        if constraint.complete:
            break
    return times


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


def rates(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    return {k: 100.0 * sum(r[k] for r in rows) / n for k in ("parses", "valid", "exact")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("package", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured.json")
    args = parser.parse_args()
    data = json.loads(DATA.read_text(encoding="utf-8"))
    model = edge_qwen.load(args.package)
    rng = np.random.default_rng(0)
    results: dict[str, list[dict]] = {"unconstrained": [], "constrained": []}
    kinds: list[str] = []
    for i, case in enumerate(data["cases"][: args.limit]):
        order = (False, True) if i % 2 == 0 else (True, False)
        for constrained in order:
            if "schema" in case:
                row = extraction(model, case, data["schemas"][case["schema"]], constrained)
            else:
                row = tool_call(model, case, data["tools"], constrained)
            results["constrained" if constrained else "unconstrained"].append(row)
        kinds.append("extraction" if "schema" in case else "tool call")
        print(i, kinds[-1], {k: v[-1]["exact"] for k, v in results.items()}, flush=True)
    replays = [mask_cost_ms(model, row["grammar"], row["tokens"], rng) for row in results["constrained"]]
    first = [times[0] for times in replays]  # the matcher's first mask also builds its lexer
    mask = [t for times in replays for t in times[1:]]
    step = float(
        np.median([r["decode_ms_per_token"] for r in results["unconstrained"] if r["generated"] > 1])
    )
    summary = {
        "package": str(args.package),
        "cases": len(kinds),
        "extraction_cases": kinds.count("extraction"),
        "tool_cases": kinds.count("tool call"),
        "rates": {mode: rates(rows) for mode, rows in results.items()},
        "rates_by_kind": {
            mode: {
                kind: rates([r for r, k in zip(rows, kinds, strict=True) if k == kind])
                for kind in sorted(set(kinds))
            }
            for mode, rows in results.items()
        },
        "decode_ms_per_token_median": {
            mode: float(np.median([r["decode_ms_per_token"] for r in rows if r["generated"] > 1]))
            for mode, rows in results.items()
        },
        "mask_ms_per_token": {
            "median": float(np.median(mask)),
            "p90": float(np.percentile(mask, 90)),
            "mean": float(np.mean(mask)),
        },
        "mask_ms_first_token": {"median": float(np.median(first)), "max": float(np.max(first))},
        "mask_share_of_decode_step_percent": 100.0 * float(np.mean(mask)) / step,
        "cpu": cpu_name(),
        "load_average": os.getloadavg(),
        "onnxruntime_threads": "default",
        "rows": {
            mode: [{k: v for k, v in r.items() if k not in ("tokens", "grammar")} for r in rows]
            for mode, rows in results.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()

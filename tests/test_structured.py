"""Constrained decoding: outputs that parse and hold to their schema, regex or grammar, on the tiny models
(whose random weights would never write valid JSON unaided) and on the real 0.5B (slow tier)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import edge_qwen
from edge_qwen.apps.cli import cli
from edge_qwen.constraints import compile_constraint, grammar_for
from edge_qwen.generation import GenerationConfig
from edge_qwen.sampling import Sampler, SamplerConfig

SAMPLED = {"temperature": 1.0, "max_tokens": 800}  # whitespace between tokens counts too
REAL_INT4 = Path.home() / ".cache" / "edge-qwen-bench" / "compare" / "qwen2.5-coder-0.5b-instruct-int4"

SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {
        "type": "object",
        "properties": {"currency": {"enum": ["EUR", "USD", "GBP"]}, "paid": {"type": "boolean"}},
        "required": ["currency", "paid"],
        "additionalProperties": False,
    },
    "anyOf": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"n": {"type": "integer", "maximum": 999}},
                "required": ["n"],
                "additionalProperties": False,
            },
            {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        ]
    },
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "minItems": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 2,
        "maxItems": 4,
    },
    "bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 65},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        },
        "required": ["age", "score"],
        "additionalProperties": False,
    },
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "unicode": {
        "type": "object",
        "properties": {"city": {"enum": ["東京", "Zürich", "Москва", "🙂 smile"]}, "note": {"const": "née"}},
        "required": ["city", "note"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_fp32)


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_output_parses_and_validates(model: edge_qwen.Model, name: str) -> None:
    schema = SCHEMAS[name]
    for seed in range(3):
        pieces = list(model.stream("fill it in", response_format=schema_format(schema), seed=seed, **SAMPLED))
        text = "".join(p.text for p in pieces)
        assert pieces[-1].finish_reason == "stop", (seed, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_allows_an_object_and_nothing_else(model: edge_qwen.Model) -> None:
    # A random model rarely closes a free-form object, so this looks at the mask itself (the real
    # model's objects are checked in the slow tier and in bench/structured.py).
    constraint = compile_constraint(
        model, grammar_for(GenerationConfig(response_format={"type": "json_object"}))
    )
    allowed = np.flatnonzero(constraint.allowed())
    firsts = {model.tokenizer.decode([int(t)]) for t in allowed}
    assert firsts and all(t.lstrip(" \n").startswith("{") or not t.strip(" \n") for t in firsts), firsts
    assert "{" in firsts and '"' not in firsts and "[" not in firsts
    for token in model.tokenizer.encode('{"a": [1, {"b": null}]}', add_special_tokens=False).ids:
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.complete


def test_output_ends_when_complete_without_a_stop_token(model: edge_qwen.Model) -> None:
    pieces = list(model.stream("x", response_format=schema_format(SCHEMAS["pattern"]), **SAMPLED))
    assert pieces[-1].finish_reason == "stop"
    assert pieces[-1].token_id not in model.stop_token_ids  # the step after the closing quote never ran
    assert re.fullmatch(r'"[A-Z]{2}-[0-9]{3}"', "".join(p.text for p in pieces))


def test_greedy_constrained_run_is_deterministic(model: edge_qwen.Model) -> None:
    fmt = schema_format(SCHEMAS["nested"])
    runs = [model.generate("same prompt", response_format=fmt, max_tokens=800) for _ in range(2)]
    assert runs[0] == runs[1]
    jsonschema.validate(json.loads(runs[0]), SCHEMAS["nested"])


def test_every_sampling_option_still_works_under_a_mask(model: edge_qwen.Model) -> None:
    options = {"top_k": 5, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3, "presence_penalty": 0.5}
    for seed in range(3):
        text = model.generate(
            "x", response_format=schema_format(SCHEMAS["bounds"]), seed=seed, **SAMPLED, **options
        )
        jsonschema.validate(json.loads(text), SCHEMAS["bounds"])


def test_regex_and_lark_grammar(model: edge_qwen.Model) -> None:
    for seed in range(3):
        date = model.generate("d", regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", seed=seed, **SAMPLED)
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", date)
        grammar = 'start: "add(" NUM ", " NUM ")"\nNUM: /[0-9]{1,3}/\n'
        call = model.generate("g", grammar=grammar, seed=seed, **SAMPLED)
        assert re.fullmatch(r"add\([0-9]{1,3}, [0-9]{1,3}\)", call)


def test_constraint_works_in_chat_turns(model: edge_qwen.Model) -> None:
    chat = model.chat(temperature=1.0, seed=0, max_tokens=800)
    first = chat.send("one", response_format=schema_format(SCHEMAS["enum"]))
    jsonschema.validate(json.loads(first), SCHEMAS["enum"])
    second = chat.send("two", response_format=schema_format(SCHEMAS["minItems"]))
    jsonschema.validate(json.loads(second), SCHEMAS["minItems"])
    assert chat.last_stats is not None and chat.last_stats.reused_tokens > 0


def test_output_longer_than_max_tokens_ends_with_length(
    model: edge_qwen.Model, caplog: pytest.LogCaptureFixture
) -> None:
    schema = {"const": "The capital of France is Paris. " * 4}
    with caplog.at_level(logging.WARNING):
        pieces = list(model.stream("x", response_format=schema_format(schema), max_tokens=6))
    assert pieces[-1].finish_reason == "length" and pieces[-1].generated_tokens == 6
    assert '"The capital'.startswith("".join(p.text for p in pieces)[:11])
    assert "cut at max_tokens=6 before it was complete" in caplog.text


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [({"not": {"type": "string"}}, "not"), ({"type": "array", "uniqueItems": True}, "uniqueItems")],
)
def test_uncompilable_schema_is_a_value_error_before_any_token(
    model: edge_qwen.Model, schema: dict[str, Any], keyword: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    monkeypatch.setattr(model, "_run", lambda chunk, cache: runs.append(chunk.size))
    with pytest.raises(ValueError, match=rf"cannot be compiled: .*{keyword}"):
        model.stream("x", response_format=schema_format(schema))
    chat = model.chat()
    with pytest.raises(ValueError, match=keyword):
        chat.stream("x", response_format=schema_format(schema))
    assert runs == [] and chat.messages == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"response_format": {"type": "xml"}}, "response_format must be"),
        ({"response_format": {"type": "json_schema"}}, "needs {'json_schema'"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"tool_choice": "always"}, "tool_choice must be"),
        ({"regex": "a+", "response_format": {"type": "json_object"}}, "give only one of them"),
        ({"regex": "(unclosed"}, "cannot be compiled"),
        ({"grammar": "start: undefined_rule"}, "cannot be compiled"),
    ],
)
def test_bad_constraints_name_the_problem(
    model: edge_qwen.Model, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        model.stream("x", **options)


def test_sampler_masks_before_top_k_and_penalties() -> None:
    logits = np.array([9.0, 1.0, 5.0, 4.0], np.float32)
    allowed = np.array([False, True, True, True])
    # top_k=1 after the mask keeps token 2; before it, it would keep only the masked token 0.
    sampler = Sampler(SamplerConfig(temperature=1.0, top_k=1, seed=0))
    assert {sampler(logits, allowed=allowed) for _ in range(20)} == {2}
    # The repetition penalty then sees only the allowed tokens: penalizing 2 hands the pick to 3.
    greedy = Sampler(SamplerConfig(repetition_penalty=2.0))
    assert greedy(logits, [2], allowed=allowed) == 3
    assert greedy(logits, [2]) == 0
    with pytest.raises(ValueError, match="permits no token"):
        greedy(logits, allowed=np.zeros(4, bool))


# -- the command line ---------------------------------------------------------------------------


def test_cli_json_schema_regex_and_json(tiny_fp32: Path, tmp_path: Path) -> None:
    schema_file = tmp_path / "invoice.json"
    schema_file.write_text(json.dumps(SCHEMAS["bounds"]))
    runner = CliRunner()
    common = [str(tiny_fp32), "x", "--temperature", "1", "--seed", "1", "--max-tokens", "200"]
    out = runner.invoke(cli, ["generate", *common, "--json-schema", str(schema_file)])
    assert out.exit_code == 0, out.output
    jsonschema.validate(json.loads(out.stdout), SCHEMAS["bounds"])
    out = runner.invoke(cli, ["generate", *common, "--regex", "[a-c]{4}!"])
    assert out.exit_code == 0 and re.fullmatch(r"[a-c]{4}!\n", out.stdout), out.output
    out = runner.invoke(cli, ["generate", *common, "--json"])
    assert out.exit_code == 0 and isinstance(json.loads(out.stdout), dict), out.output


def test_cli_bad_schema_is_one_line(tiny_fp32: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    unsupported = tmp_path / "not.json"
    unsupported.write_text('{"not": {"type": "string"}}')
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    for path, message in [(unsupported, "not"), (broken, "is not a JSON file")]:
        out = runner.invoke(cli, ["generate", str(tiny_fp32), "x", "--json-schema", str(path)])
        assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output
    out = runner.invoke(cli, ["generate", str(tiny_fp32), "x", "--json", "--json-schema", str(broken)])
    assert out.exit_code == 2 and "not both" in out.output


# -- the real 0.5B --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> edge_qwen.Model:
    if not (REAL_INT4 / "edge_qwen.json").is_file():
        pytest.skip(f"real model package absent: {REAL_INT4}")
    return edge_qwen.load(REAL_INT4)


@pytest.mark.slow
def test_real_extraction_parses_validates_and_extracts(real: edge_qwen.Model) -> None:
    schema = {
        "type": "object",
        "properties": {
            "payer": {"type": "string"},
            "amount": {"type": "number", "minimum": 0},
            "currency": {"enum": ["EUR", "USD", "GBP"]},
            "items": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["payer", "amount", "currency", "items"],
        "additionalProperties": False,
    }
    prompt = (
        "Extract payer, amount, currency and items as JSON: 'Alice paid 42.50 euros for a taxi and a coffee.'"
    )
    text = real.generate(prompt, response_format=schema_format(schema), max_tokens=120)
    data = json.loads(text)
    jsonschema.validate(data, schema)
    assert data["payer"] == "Alice" and data["currency"] == "EUR" and data["amount"] == 42.5


@pytest.mark.slow
def test_real_cli_json_schema(tmp_path: Path) -> None:
    if not (REAL_INT4 / "edge_qwen.json").is_file():
        pytest.skip(f"real model package absent: {REAL_INT4}")
    schema = SCHEMAS["unicode"]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    args = [
        "generate",
        str(REAL_INT4),
        "Which city is the capital of Japan?",
        "--json-schema",
        str(tmp_path / "s.json"),
    ]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    jsonschema.validate(data, schema)

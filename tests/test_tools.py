"""Tool calls: Qwen2.5's `<tool_call>` blocks parsed into ToolCalls, left out of the text, constrained by
the tool's schema when a call is required, and tool results fed back into a cached conversation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import edge_qwen
from edge_qwen.chat_template import ChatTemplate
from edge_qwen.tool_calls import ToolCallStream, parse_tool_calls

QWEN_TEMPLATE = json.loads(
    (Path(__file__).parent / "data" / "qwen2.5_instruct_tokenizer_config.json").read_text()
)["chat_template"]
# Qwen2.5's template with its long English preamble cut: the tiny tokenizer spends a token per byte
# on it, and the tiny context is 1024 tokens. Tools, tool calls and tool results render as in Qwen2.5.
TINY_TEMPLATE = (
    QWEN_TEMPLATE.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "Hi.")
    .replace("You may call one or more functions to assist with the user query.", "")
    .replace("You are provided with function signatures within <tools></tools> XML tags:", "")
    .replace("For each function call, return a json object with function name and arguments within ", "")
    .replace("<tool_call></tool_call> XML tags:", "")
    .replace(
        '<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>', ""
    )
)
REAL_INT4 = Path.home() / ".cache" / "edge-qwen-bench" / "compare" / "qwen2.5-coder-0.5b-instruct-int4"

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
SAMPLED = {"temperature": 1.0, "max_tokens": 300}


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    """The tiny model, rendering with Qwen2.5's own template (tools in the system prompt)."""
    m = edge_qwen.load(tiny_fp32)
    m.chat_template = ChatTemplate(TINY_TEMPLATE, None, "<|im_end|>")  # type: ignore[misc]
    return m


# -- parsing ------------------------------------------------------------------------------------


def test_several_calls_with_nested_arguments() -> None:
    text = (
        "Checking both.\n"
        '<tool_call>\n{"name": "book", "arguments": {"who": {"name": "Zoë", "tags": ["a", {"b": [1, 2]}]}}}\n'
        "</tool_call>\n"
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    )
    plain, calls = parse_tool_calls(text)
    assert plain == "Checking both."
    assert [c.name for c in calls] == ["book", "get_time"]
    assert json.loads(calls[0].arguments) == {"who": {"name": "Zoë", "tags": ["a", {"b": [1, 2]}]}}
    assert json.loads(calls[1].arguments) == {"zone": "UTC"}
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert calls[1].message() == {
        "id": calls[1].id,
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
    }


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ('<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>', "is not JSON"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', "no function name"),
        ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "not an object"),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}', "unclosed"),
    ],
)
def test_malformed_call_becomes_text_and_a_warning(
    text: str, warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        plain, calls = parse_tool_calls("Sure. " + text)
    assert calls == () and plain == "Sure. " + text
    assert warning in caplog.text


def test_arguments_given_as_json_text_are_accepted() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"a": 1}


def test_stream_holds_back_calls_split_across_pieces() -> None:
    stream = ToolCallStream()
    pieces = ["Let me ", "look.<tool", '_call>\n{"name": ', '"f", "arguments": {}}\n</tool_', "call>"]
    shown = "".join(stream.push(p) for p in pieces)
    tail, calls = stream.finish()
    assert shown == "Let me look." and tail == "" and [c.name for c in calls] == ["f"]
    plain = ToolCallStream()
    # whitespace and a possible start of <tool_call> wait; released once it is plain text after all
    assert plain.push("a <tool") == "a" and plain.push(" not a call \n") == " <tool not a call"
    assert plain.finish() == (" \n", ())


# -- chats with tools ---------------------------------------------------------------------------


def test_required_call_validates_against_the_tool_schema(model: edge_qwen.Model) -> None:
    for seed in range(4):
        chat = model.chat(tools=TOOLS, seed=seed, **SAMPLED)
        pieces = list(chat.stream("weather or time?", tool_choice="required"))
        last = pieces[-1]
        assert last.finish_reason == "tool_calls" and len(last.tool_calls) == 1
        call = last.tool_calls[0]
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert "".join(p.text for p in pieces) == ""  # the call is data, not text
        assert chat.last_stats is not None and chat.last_stats.tool_calls == last.tool_calls


def test_named_function_is_the_one_called(model: edge_qwen.Model) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        chat = model.chat(tools=TOOLS, seed=seed, **SAMPLED)
        last = list(chat.stream("time?", tool_choice=choice))[-1]
        assert [c.name for c in last.tool_calls] == ["get_time"]
        jsonschema.validate(json.loads(last.tool_calls[0].arguments), TIME)


def test_tool_result_goes_back_and_the_next_turn_reuses_the_cache(model: edge_qwen.Model) -> None:
    chat = model.chat(tools=TOOLS, seed=1, **SAMPLED)
    first = list(chat.stream("weather?", tool_choice="required"))[-1]
    call = first.tool_calls[0]
    answer = chat.messages[-1]
    assert answer == {"role": "assistant", "content": None, "tool_calls": [call.message()]}
    with pytest.raises(ValueError, match="no tool call 'call_nope'"):
        chat.add_tool_result("call_nope", "{}")
    chat.add_tool_result(call.id, json.dumps({"temperature": 21}))
    one = chat.last_stats
    chat.send(None, max_tokens=4)
    two = chat.last_stats
    assert one is not None and two is not None
    assert two.reused_tokens >= one.prompt_tokens
    prompt = model.tokenizer.decode(chat.cache.tokens, skip_special_tokens=False)  # what the turn ran
    assert f'{{"name": "{call.name}", "arguments": {call.arguments}}}' in prompt  # an object, as generated
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt


def test_auto_parses_what_the_model_writes(model: edge_qwen.Model) -> None:
    # A regex makes the tiny model write two calls (with nested arguments) after some text.
    calls = (
        'Two calls.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "JST"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "book", "arguments": {"who": {"tags": ["x", {"n": 1}]}}}\n</tool_call>'
    )
    chat = model.chat(tools=TOOLS, max_tokens=300)
    pieces = list(chat.stream("go", regex=_literal(calls)))
    assert "".join(p.text for p in pieces) == "Two calls."
    assert [c.name for c in pieces[-1].tool_calls] == ["get_time", "book"]
    assert json.loads(pieces[-1].tool_calls[1].arguments) == {"who": {"tags": ["x", {"n": 1}]}}
    assert pieces[-1].finish_reason == "tool_calls"
    none = model.chat(tools=TOOLS, max_tokens=300)
    text = none.send("go", regex=_literal(calls), tool_choice="none")
    assert text == calls and none.last_stats is not None and none.last_stats.tool_calls == ()


def test_malformed_call_in_a_chat_is_text(model: edge_qwen.Model, caplog: pytest.LogCaptureFixture) -> None:
    broken = '<tool_call>\n{"name": "get_time", "arguments": {"zone": }\n</tool_call>'
    chat = model.chat(tools=TOOLS, max_tokens=300)
    with caplog.at_level(logging.WARNING):
        pieces = list(chat.stream("go", regex=_literal(broken)))
    assert "".join(p.text for p in pieces) == broken
    assert pieces[-1].tool_calls == () and pieces[-1].finish_reason == "stop"
    assert "is not JSON" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "give only one"),
    ],
)
def test_bad_tool_choice(model: edge_qwen.Model, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.chat(tools=TOOLS).stream("x", **options)
    with pytest.raises(ValueError, match="needs tools"):
        model.chat().stream("x", tool_choice="required")


def _literal(text: str) -> str:
    """A regex matching exactly `text`."""
    import re

    return re.escape(text)


# -- the real 0.5B ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_calls_a_tool_and_uses_its_result() -> None:
    if not (REAL_INT4 / "edge_qwen.json").is_file():
        pytest.skip(f"real model package absent: {REAL_INT4}")
    real = edge_qwen.load(REAL_INT4)
    weather = {**WEATHER, "properties": {"city": {"type": "string"}, "unit": WEATHER["properties"]["unit"]}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}, TOOLS[1]]
    chat = real.chat(tools=tools, max_tokens=80)
    last = list(chat.stream("What's the weather in Paris, in celsius?", tool_choice="required"))[-1]
    assert last.finish_reason == "tool_calls"
    call = last.tool_calls[0]
    assert call.name == "get_weather"
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, weather)
    assert arguments["city"] == "Paris"
    first = chat.last_stats
    chat.add_tool_result(call.id, json.dumps({"temperature": 21, "sky": "sunny"}))
    chat.send(None, max_tokens=8)  # what this small Coder model answers is not under test
    stats = chat.last_stats
    assert first is not None and stats is not None
    assert stats.reused_tokens >= first.prompt_tokens  # the call and the result: only the new part ran
    prompt = real.tokenizer.decode(chat.cache.tokens, skip_special_tokens=False)
    assert f'{{"name": "get_weather", "arguments": {call.arguments}}}' in prompt
    assert '<tool_response>\n{"temperature": 21, "sky": "sunny"}\n</tool_response>' in prompt

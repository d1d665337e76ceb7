"""`edge-qwen serve` with structured output: response_format with a schema, and tool calls that
round-trip through a tool message, through the official openai client."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

import edge_qwen
from edge_qwen.apps.server_openai import DEFAULT_SAMPLING
from tests.server_fixtures import PLAIN, SEEDED, alone, client, model, server, tiny_package
from tests.server_process import ServerProcess

__all__ = ["model", "server", "tiny_package"]  # fixtures


CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["city", "n"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


def test_response_format_with_a_schema(server: ServerProcess, model: edge_qwen.Model) -> None:
    messages = [{"role": "user", "content": "A city and a digit, as JSON"}]
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    options = {**SEEDED, "max_tokens": 800}  # the tiny model writes much whitespace
    reply = client(server).chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        response_format=response_format,  # type: ignore[arg-type]
        **options,
    )
    content = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop"
    value = json.loads(content)
    assert set(value) == {"city", "n"} and value["city"] in ("Paris", "Rome") and 0 <= value["n"] <= 9
    assert content == alone(
        model, messages, **{**DEFAULT_SAMPLING, **options}, response_format=response_format
    )


def test_an_unsupported_schema_is_a_400_naming_it(server: ServerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "if": {"required": ["a"]},
        "then": {},
    }
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert raised.value.status_code == 400 and "if" in raised.value.message


def test_a_tool_call_round_trips_through_a_tool_message(server: ServerProcess) -> None:
    api = client(server)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "The weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    call = api.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=forced,  # type: ignore[arg-type]
        **PLAIN,
    )
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(tool_call.function.arguments)["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
    assert tool_call.id.startswith("call_")
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"celsius": 21}'},
    ]
    answer = api.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        **SEEDED,
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and not answer.choices[0].message.tool_calls
    assert (
        call.usage is not None and answer.usage is not None and answer.usage.prompt_tokens_details is not None
    )
    assert answer.usage.prompt_tokens_details.cached_tokens >= call.usage.prompt_tokens


def test_a_streamed_tool_call_arrives_whole(server: ServerProcess) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "The weather in Rome?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            stream=True,
            **PLAIN,
        )
    )
    calls = [d for c in chunks if c.choices and (d := c.choices[0].delta).tool_calls]
    assert len(calls) == 1 and calls[0].tool_calls is not None
    assert calls[0].tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].tool_calls[0].function.arguments or "")["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

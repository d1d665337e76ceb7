"""`edge-qwen serve` on the real default model (slow tier): Paris, then Rome on the resent conversation,
whose second request reuses the cache of the first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import real_model
from tests.server_process import ServerProcess, serve

pytestmark = pytest.mark.slow

DEFAULT_INT4 = Path.home() / ".cache/edge-qwen-bench/compare/qwen2.5-coder-0.5b-instruct-int4"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    package = DEFAULT_INT4 if (DEFAULT_INT4 / "edge_qwen.json").is_file() else real_model.exported("q05-int4")
    with serve(package) as running:
        yield running


def test_paris_then_rome_with_the_conversation_resent(server: ServerProcess) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    one = api.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    answer = one.choices[0].message.content or ""
    assert "Paris" in answer
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And of Italy? Answer in one word."},
    ]
    chunks = api.chat.completions.create(
        model="default",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chunks)
    assert "Rome" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    first, second = one.usage, chunks[-1].usage
    assert first is not None and second is not None and second.prompt_tokens_details is not None
    # Only the new turn was prefilled: the whole first prompt came from the cache.
    assert first.prompt_tokens <= second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    lines = server.wait_for_log("/v1/chat/completions", 2)
    assert f"cached={second.prompt_tokens_details.cached_tokens}" in lines[1]
    print("\n".join(lines))  # the record of the run: pytest -s shows it


def test_a_tool_call_round_trip(server: ServerProcess) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current temperature in a city, in degrees Celsius",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the temperature in Paris now?"}]
    call = api.chat.completions.create(
        model="default",
        messages=messages,  # type: ignore[arg-type]
        tools=[weather],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)  # type: ignore[union-attr]
    assert "Paris" in arguments["city"]
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": '{"celsius": 17}'},
    ]
    answer = api.chat.completions.create(
        model="default",
        messages=messages,  # type: ignore[arg-type]
        tools=[weather],  # type: ignore[list-item]
        temperature=0,
        max_tokens=64,
    )
    # The tool's result reached the model through Qwen's template (as a <tool_response>); what the 0.5B
    # makes of it varies, so the answer is only shown, not judged.
    print("answer after the tool result:", answer.choices[0].message.content)
    assert (
        call.usage is not None and answer.usage is not None and answer.usage.prompt_tokens_details is not None
    )
    # The resent call was rendered as the model wrote it: its prompt and the call came from the cache.
    assert answer.usage.prompt_tokens_details.cached_tokens > call.usage.prompt_tokens

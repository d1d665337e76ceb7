"""`edge-qwen serve` on the real default model (slow tier): Paris, then Rome on the resent conversation,
whose second request reuses the cache of the first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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

"""ChatSession.stream_messages: a whole conversation resent each turn reuses the cache it shares."""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_qwen

SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 10}


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_fp32)


def reply(session: edge_qwen.ChatSession, messages: list[dict[str, str]]) -> str:
    return "".join(piece.text for piece in session.stream_messages(messages, **SAMPLED))


def test_resent_conversation_prefills_only_the_new_turn(model: edge_qwen.Model) -> None:
    session = model.chat()
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "The capital of France"}]
    answer = reply(session, first)
    one = session.last_stats
    assert one is not None and one.reused_tokens == 0
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "def f(x):"}]
    again = reply(session, second)
    two = session.last_stats
    assert two is not None
    assert one.prompt_tokens <= two.reused_tokens < two.prompt_tokens  # the whole first prompt reused
    assert session.messages == [*second, {"role": "assistant", "content": again}]
    fresh = model.chat()
    assert reply(fresh, second) == again  # reusing the cache changes nothing in the reply
    assert fresh.last_stats is not None and fresh.last_stats.reused_tokens == 0


def test_another_conversation_rewinds_to_what_it_shares(model: edge_qwen.Model) -> None:
    session = model.chat()
    france, code = (
        [{"role": "user", "content": "The capital of France"}],
        [{"role": "user", "content": "def f(x):"}],
    )
    reply(session, france)
    reply(session, code)
    a, b = model.encode_prompt(france), model.encode_prompt(code)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    stats = session.last_stats
    assert stats is not None and stats.reused_tokens == shared > 0  # the template's opening alone
    assert session.messages[0] == {"role": "user", "content": "def f(x):"}


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]],
    ids=["empty", "ends-with-a-reply"],
)
def test_nothing_to_reply_to_is_a_clear_error(model: edge_qwen.Model, messages: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="nothing to reply to"):
        model.chat().stream_messages(messages)

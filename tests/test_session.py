"""Chat sessions: the cache is kept between turns, only new tokens are prefilled, edits rewind it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_qwen
from edge_qwen.engine import PREFILL_CHUNK
from edge_qwen.session import ChatSession

SAMPLED = {"temperature": 1.0, "seed": 5, "max_tokens": 12}  # the tiny models' greedy output is one token
GLUE = "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # the tiny template's


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_fp32)


@pytest.fixture
def runs(model: edge_qwen.Model, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of ids each graph run of `model` gets: what the session really prefilled."""
    sizes: list[int] = []
    run = model._run
    monkeypatch.setattr(model, "_run", lambda chunk, cache: (sizes.append(chunk.size), run(chunk, cache))[1])
    yield sizes


def n_tokens(model: edge_qwen.Model, text: str) -> int:
    return len(model.tokenizer.encode(text, add_special_tokens=False).ids)


def test_turn_two_prefills_only_the_new_tokens(model: edge_qwen.Model, runs: list[int]) -> None:
    chat = model.chat(system="be brief", max_tokens=8)
    first = chat.send("The capital of France")
    one = chat.last_stats
    assert one is not None and one.reused_tokens == 0 and one.prefilled_tokens == one.prompt_tokens
    runs.clear()
    chat.send("And of Italy?")
    two = chat.last_stats
    assert two is not None
    # The second prompt is the first, the reply, the glue and the new message. Reused: the whole first
    # prompt, and of the reply what the tokenizer gives back as the same ids; prefilled: the rest.
    assert two.prompt_tokens == one.prompt_tokens + n_tokens(model, first + GLUE.format("And of Italy?"))
    assert one.prompt_tokens <= two.reused_tokens <= one.prompt_tokens + one.generated_tokens
    assert two.prompt_tokens == two.reused_tokens + two.prefilled_tokens
    prefill = [
        min(PREFILL_CHUNK, two.prefilled_tokens - i) for i in range(0, two.prefilled_tokens, PREFILL_CHUNK)
    ]
    assert runs == prefill + [1] * (two.generated_tokens - 1)  # the new ids in chunks, then one per step


def test_reused_cache_gives_the_same_reply_as_a_fresh_prompt(model: edge_qwen.Model) -> None:
    chat = model.chat(system="be brief", **SAMPLED)
    for turn, text in enumerate(["hello", "The capital of France", "def f(x):"]):
        reply = chat.send(text)
        stats = chat.last_stats
        assert stats is not None
        assert reply == model.generate(chat.messages[:-1], **SAMPLED)  # the whole conversation from scratch
        # However the last reply re-tokenizes, at most it and the new message are prefilled:
        assert (
            turn == 0
            or stats.prefilled_tokens <= n_tokens(model, GLUE.format(text)) + SAMPLED["max_tokens"] + 1
        )
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 3
    assert chat.stats[1].reused_tokens >= chat.stats[0].prompt_tokens - 1


def test_regenerate_rewinds_to_the_end_of_the_prompt(model: edge_qwen.Model, runs: list[int]) -> None:
    chat = model.chat(**SAMPLED)
    chat.send("hello")
    reply = chat.send("The capital of France")
    runs.clear()
    assert chat.regenerate() == reply  # seeded: the same draw again
    stats = chat.last_stats
    assert stats is not None and stats.prefilled_tokens == 1 and runs[0] == 1  # only the prompt's last id
    assert chat.regenerate(seed=6) != reply
    assert len(chat.messages) == 4 and chat.messages[-2]["content"] == "The capital of France"


def test_edit_last_user_rewinds_to_before_it(model: edge_qwen.Model) -> None:
    chat = model.chat(**SAMPLED)
    chat.send("hello")
    before = chat.last_stats
    chat.send("The capital of France")
    reply = chat.edit_last_user("The capital of Italy")
    stats = chat.last_stats
    assert before is not None and stats is not None
    assert stats.reused_tokens >= before.prompt_tokens - 1  # the first turn is still cached
    assert stats.prefilled_tokens <= n_tokens(model, GLUE.format("The capital of Italy")) + 13
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["hello", "The capital of Italy"]
    assert reply == model.generate(chat.messages[:-1], **SAMPLED)
    before = chat.messages
    with pytest.raises(edge_qwen.ContextFullError):
        chat.edit_last_user("Paris " * 1100)  # does not fit: the conversation stays as it was
    assert chat.messages == before


def test_pop_and_reset(model: edge_qwen.Model) -> None:
    chat = model.chat(system="sys", **SAMPLED)
    chat.send("hello")
    assert chat.pop()["role"] == "assistant" and chat.pop() == {"role": "user", "content": "hello"}
    with pytest.raises(ValueError, match="no message to remove"):
        chat.pop()
    chat.send("hello")
    chat.reset()
    assert (
        chat.messages == [{"role": "system", "content": "sys"}] and chat.cache.length == 0 and not chat.stats
    )
    with pytest.raises(ValueError, match="nothing to regenerate"):
        chat.regenerate()
    with pytest.raises(ValueError, match="no user message to edit"):
        chat.edit_last_user("x")


def test_stream_yields_pieces_and_a_closed_stream_keeps_its_partial_reply(model: edge_qwen.Model) -> None:
    chat = model.chat(**SAMPLED)
    stream = chat.stream("hello")
    first = next(stream)
    stream.close()
    stats = chat.last_stats
    assert stats is not None and stats.finish_reason == "interrupted" and stats.generated_tokens == 1
    assert chat.messages[-1] == {"role": "assistant", "content": first.text}
    chat.pop()
    pieces = list(chat.stream(None))  # None: reply to the conversation as it stands
    assert "".join(p.text for p in pieces) == model.generate("hello", **SAMPLED)
    stats = chat.last_stats
    assert stats is not None and stats.finish_reason == pieces[-1].finish_reason in ("stop", "length")


def test_overflow_error_names_the_numbers_and_leaves_the_session_usable(model: edge_qwen.Model) -> None:
    chat = model.chat(system="sys", max_context=96, **SAMPLED)
    with pytest.raises(edge_qwen.ContextFullError) as e:
        for i in range(20):
            chat.send(f"The capital of France {i}")
    message = str(e.value)
    assert "> the context of 96 tokens" in message and "max_tokens 12" in message
    assert "overflow='truncate-oldest'" in message
    before = chat.messages
    assert before[-1]["role"] == "assistant"  # the message that did not fit was not added
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "sys"}] and chat.stats == []
    fresh = model.chat(system="sys", max_context=96, **SAMPLED)
    assert chat.send("hello") == fresh.send("hello")
    after, alone = chat.last_stats, fresh.last_stats
    assert after is not None and alone is not None
    assert after.reused_tokens == 0 and after.prefilled_tokens == alone.prompt_tokens  # the cache was emptied
    assert after.generated_tokens == alone.generated_tokens


def test_truncate_oldest_keeps_the_system_message(model: edge_qwen.Model) -> None:
    chat = model.chat(system="sys", max_context=96, overflow="truncate-oldest", **SAMPLED)
    for i in range(12):
        reply = chat.send(f"The capital of France {i}")
        assert chat.last_stats is not None
        assert chat.last_stats.prompt_tokens + 12 <= 96
    messages = chat.messages
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[-2] == {"role": "user", "content": "The capital of France 11"}
    assert len(messages) < 1 + 2 * 12 and sum(s.dropped_messages for s in chat.stats) == 2 * 12 + 1 - len(
        messages
    )
    assert messages[1]["role"] == "user"  # whole turns were dropped
    assert reply == model.generate(messages[:-1], **SAMPLED)
    with pytest.raises(edge_qwen.ContextFullError, match="even cut to its last turn"):
        chat.send("Paris " * 100)


def test_bad_session_options(model: edge_qwen.Model) -> None:
    with pytest.raises(ValueError, match="overflow must be one of error, truncate-oldest, got 'drop'"):
        model.chat(overflow="drop")
    with pytest.raises(ValueError, match="top_p must be in"):
        model.chat(top_p=2.0)
    with pytest.raises(ValueError, match="max_context must be an integer in"):
        model.chat(max_context=5000)
    chat = model.chat()
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 0"):
        chat.send("hi", max_tokens=0)
    with pytest.raises(ValueError, match="nothing to reply to"):
        chat.send(None)


def test_sessions_have_their_own_caches(model: edge_qwen.Model) -> None:
    a, b, alone = model.chat(**SAMPLED), model.chat(**SAMPLED), model.chat(**SAMPLED)
    assert isinstance(a, ChatSession) and a.cache is not b.cache
    a.send("hello")
    b.send("The capital of France")  # between a's turns: must not disturb a's cache
    assert a.send("def f(x):") == (alone.send("hello"), alone.send("def f(x):"))[1]
    assert a.last_stats is not None and alone.last_stats is not None
    assert a.last_stats.reused_tokens == alone.last_stats.reused_tokens


# -- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_two_turn_chat_reuses_the_cache() -> None:
    from tests import real_model

    m = edge_qwen.load(real_model.exported("q05-fp32", "--precision", "fp32"))
    chat = m.chat(max_tokens=16)
    assert "Paris" in chat.send("What is the capital of France? Answer in one word.")
    one = chat.last_stats
    assert "Rome" in chat.send("And of Italy?")
    two = chat.last_stats
    assert one is not None and two is not None
    assert two.reused_tokens >= one.prompt_tokens
    assert two.prefilled_tokens <= 16, two  # "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n..."
    answer = chat.messages[-1]["content"]
    assert chat.regenerate() == answer
    assert chat.last_stats is not None and chat.last_stats.prefilled_tokens == 1

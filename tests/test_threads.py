"""A Model shared by threads: generations are serialized, and each gets what it would get alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import edge_qwen

OPTIONS = {"temperature": 1.0, "max_tokens": 24}
PROMPTS = ["hello", "The capital of France", "def f(x):", "巴黎是法国的首都"]


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_fp32)


def run_in_threads(targets: list[tuple[str, int]], work) -> dict[int, str]:  # noqa: ANN001
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def target(i: int, prompt: str, seed: int) -> None:
        try:
            results[i] = work(prompt, seed)
        except BaseException as e:  # reported below: a thread's exception would vanish otherwise
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i, p, s)) for i, (p, s) in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_concurrent_generations_equal_sequential_ones(model: edge_qwen.Model) -> None:
    targets = [(p, seed) for seed in (1, 2) for p in PROMPTS]
    sequential = [model.generate(p, seed=s, **OPTIONS) for p, s in targets]
    concurrent = run_in_threads(targets, lambda p, s: model.generate(p, seed=s, **OPTIONS))
    assert [concurrent[i] for i in range(len(targets))] == sequential


def test_concurrent_chat_sessions_equal_sequential_ones(model: edge_qwen.Model) -> None:
    def conversation(prompt: str, seed: int) -> str:
        chat = model.chat(seed=seed, **OPTIONS)
        return "|".join(chat.send(text) for text in (prompt, "and then?", prompt))

    targets = [(p, 3) for p in PROMPTS]
    sequential = [conversation(p, s) for p, s in targets]
    concurrent = run_in_threads(targets, conversation)
    assert [concurrent[i] for i in range(len(targets))] == sequential


def test_a_second_thread_waits_for_the_first_stream_to_finish(model: edge_qwen.Model) -> None:
    first = model.stream("hello", seed=1, **OPTIONS)
    next(first)  # the first generation now holds the model
    pieces: list[edge_qwen.StreamPiece] = []
    waiter = threading.Thread(target=lambda: pieces.extend(model.stream("def f(x):", seed=2, **OPTIONS)))
    waiter.start()
    time.sleep(0.3)
    assert pieces == []  # serialized: nothing ran while the first stream is open
    rest = list(first)
    waiter.join(timeout=60)
    assert rest[-1].finish_reason is not None and pieces and pieces[-1].finish_reason is not None
    assert "".join(p.text for p in pieces) == model.generate("def f(x):", seed=2, **OPTIONS)


def test_closing_a_stream_early_releases_the_model(model: edge_qwen.Model) -> None:
    alone = model.generate("hello", seed=1, **OPTIONS)
    stream = model.stream("hello", seed=1, **OPTIONS)
    next(stream)
    stream.close()
    # Still held, this would raise (same thread) or wait forever (another thread).
    assert model.generate("hello", seed=1, **OPTIONS) == alone
    other: list[str] = []
    waiter = threading.Thread(target=lambda: other.append(model.generate("hello", seed=1, **OPTIONS)))
    waiter.start()
    waiter.join(timeout=60)
    assert other == [alone]


def test_a_second_stream_in_the_same_thread_is_an_error_not_a_deadlock(model: edge_qwen.Model) -> None:
    alone = model.generate("def f(x):", seed=3, **OPTIONS)
    first = model.stream("hello", **OPTIONS)
    next(first)
    with pytest.raises(RuntimeError, match="already consuming a generation of this Model"):
        model.generate("def f(x):", **OPTIONS)
    first.close()
    assert model.generate("def f(x):", seed=3, **OPTIONS) == alone


def test_a_stream_may_be_resumed_from_another_thread(model: edge_qwen.Model) -> None:
    stream = model.stream("hello", seed=4, **OPTIONS)
    head: list[str] = []
    starter = threading.Thread(target=lambda: head.append(next(stream).text))
    starter.start()
    starter.join(timeout=60)
    tail = "".join(p.text for p in stream)  # resumed here: this thread now holds the model
    assert head[0] + tail == model.generate("hello", seed=4, **OPTIONS)

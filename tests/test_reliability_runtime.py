"""The runtime at its limits: prompts and max_tokens past the context, a KV cache larger than the
memory available, and Ctrl-C (KeyboardInterrupt) in the middle of a generation or a chat turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import edge_qwen
from edge_qwen import cache as cache_module
from edge_qwen.cache import KVCache, kv_bytes_per_token
from edge_qwen.errors import ContextFullError, InsufficientMemoryError
from tests.conftest import export_tiny
from tests.tiny import make_tiny_checkpoint

SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": 12}  # several tokens per reply on a tiny model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> edge_qwen.Model:
    root = tmp_path_factory.mktemp("runtime")
    return edge_qwen.load(export_tiny(make_tiny_checkpoint(root / "hf", tied=True, seed=2), root / "pkg"))


def test_a_prompt_longer_than_the_context_names_the_numbers(model: edge_qwen.Model) -> None:
    context = model.manifest.max_context
    with pytest.raises(ContextFullError, match=f"longer than the context of {context} tokens"):
        model.generate("word " * 2 * context, chat=False)
    chat = model.chat(max_context=128, max_tokens=8)
    chat.send("hello")
    before = chat.messages
    with pytest.raises(ContextFullError, match="> the context of 128 tokens"):
        chat.send("word " * 200)
    assert chat.messages == before  # the session is as it was, and goes on
    chat.send("again")


def test_max_tokens_beyond_the_context_names_the_numbers(model: edge_qwen.Model) -> None:
    context = model.manifest.max_context
    with pytest.raises(
        ContextFullError, match=rf"\+ max_tokens \({context}\) = \d+ > the context of {context}"
    ):
        model.stream("hello", max_tokens=context)  # refused when called, before any piece
    chat = model.chat(max_context=64)
    with pytest.raises(ContextFullError, match="max_tokens 64 .* > the context of 64 tokens"):
        chat.send("hello", max_tokens=64)


def test_a_kv_cache_larger_than_available_memory_is_refused_before_allocation(model: edge_qwen.Model) -> None:
    available = cache_module.available_memory()
    if available is None:
        pytest.skip("this system does not say how much memory is available")
    tokens = available // kv_bytes_per_token(model.config) + 1_000_000  # past the memory there is
    with pytest.raises(
        InsufficientMemoryError, match=rf"KV cache of {tokens} tokens needs \d+\.\d MB, but only"
    ):
        KVCache(model.config, tokens)


def test_a_generation_that_does_not_fit_in_memory_fails_before_its_first_piece(
    model: edge_qwen.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = model.generate("hello", **SAMPLED)
    per_token = kv_bytes_per_token(model.config)
    monkeypatch.setattr(cache_module, "available_memory", lambda: 10 * per_token)  # a 10-token cache
    with pytest.raises(InsufficientMemoryError, match="free memory"):
        next(iter(model.stream("hello", **SAMPLED)))
    with pytest.raises(InsufficientMemoryError):
        model.chat(max_context=512)
    monkeypatch.setattr(cache_module, "available_memory", lambda: None)  # unknown: nothing is checked
    assert model.generate("hello", **SAMPLED) == reference


def test_a_containers_memory_limit_is_what_is_available(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1000000000\n")
    (tmp_path / "memory.current").write_text("400000000\n")
    assert cache_module._cgroup_available(tmp_path) == 600_000_000
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert cache_module._cgroup_available(tmp_path) is None
    assert cache_module._cgroup_available(tmp_path / "absent") is None


class _Interrupting:
    """The model's ONNX Runtime session, raising KeyboardInterrupt at its `at`-th run: before it, or
    just after it returns (where Python raises a Ctrl-C that arrived during the run)."""

    def __init__(self, session: Any, at: int, after: bool) -> None:
        self.session, self.at, self.after, self.runs = session, at, after, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run_with_iobinding(self, binding: Any, *args: Any) -> None:
        self.runs += 1
        if self.runs == self.at and not self.after:
            raise KeyboardInterrupt
        self.session.run_with_iobinding(binding, *args)
        if self.runs == self.at and self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("at", "after"),
    [(1, False), (1, True), (4, False), (4, True)],
    ids=["prefill", "in-prefill", "decode", "in-decode"],
)
def test_ctrl_c_inside_a_turn_leaves_the_session_and_model_usable(
    model: edge_qwen.Model, monkeypatch: pytest.MonkeyPatch, at: int, after: bool
) -> None:
    chat = model.chat(system="be brief", **SAMPLED)
    chat.send("hello")
    monkeypatch.setattr(model, "session", _Interrupting(model.session, at, after))
    with pytest.raises(KeyboardInterrupt):
        chat.send("The capital of France")
    monkeypatch.undo()
    # Interrupted before its first token, the turn left no trace; after it, the partial reply is kept.
    roles = [m["role"] for m in chat.messages]
    assert roles == ["system", "user", "assistant"] + (["user", "assistant"] if at > 1 else [])
    reply = chat.send("And of Italy?")
    assert reply == model.generate(chat.messages[:-1], **SAMPLED)  # the same as a fresh session's
    assert model.generate("hello", **SAMPLED) == model.generate("hello", **SAMPLED)  # the lock is free


def _interrupt_while_reading(stream: Any, after_pieces: int) -> None:
    try:
        for n, _piece in enumerate(stream, start=1):
            if n == after_pieces:
                raise KeyboardInterrupt  # Ctrl-C while the caller prints a piece
    except KeyboardInterrupt:
        pass


def test_ctrl_c_while_the_caller_reads_a_turn_keeps_the_partial_reply(model: edge_qwen.Model) -> None:
    chat = model.chat(system="be brief", **SAMPLED)
    chat.send("hello")
    _interrupt_while_reading(chat.stream("The capital of France"), after_pieces=3)
    stats = chat.last_stats
    assert stats is not None and stats.finish_reason == "interrupted" and stats.generated_tokens == 3
    reply = chat.send("And of Italy?")
    assert reply == model.generate(chat.messages[:-1], **SAMPLED)
    _interrupt_while_reading(model.stream("hello", **SAMPLED), after_pieces=2)
    assert model.generate("hello", **SAMPLED) == model.generate("hello", **SAMPLED)

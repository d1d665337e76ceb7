"""A loaded model as text: streaming generation, one-shot completions and chat sessions."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from edge_qwen.cache import KVCache
from edge_qwen.constraints import Constraint, compile_constraint, grammar_for
from edge_qwen.engine import Engine, Prompt, check_context
from edge_qwen.generation import GenerationConfig, StreamPiece, stream_pieces
from edge_qwen.session import ChatSession

__all__ = ["Model", "StreamPiece"]


class Model(Engine):
    """A loaded package: the engine's session, tokenizer and template, with text generation on top.

    Thread safety: generations are serialized. `stream`, `generate` and chat turns hold the model's
    lock from their first piece to their last (or until the stream is closed), so threads sharing a
    Model take turns and get what they would get alone.
    """

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        chat: bool = True,
        system: str | None = None,
        **options: Any,
    ) -> Iterator[StreamPiece]:
        """Generate from a prompt, yielding one piece per token with the text it completes.

        `options` are GenerationConfig fields (max_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, seed, stop, stop_ids, and the
        constraints response_format, regex, grammar) and override `config`. Options, constraints and
        the prompt are checked here, before the first piece.
        """
        config = GenerationConfig.of(config, options)
        grammar = grammar_for(config)
        constraint = None if grammar is None else compile_constraint(self, grammar)
        prompt_ids = self.encode_prompt(prompt, chat=chat, system=system)
        check_context(len(prompt_ids), config.max_tokens, self.manifest.max_context)
        return self.serialized(self._one_shot(prompt_ids, config, constraint))

    def _one_shot(
        self, prompt_ids: list[int], config: GenerationConfig, constraint: Constraint | None
    ) -> Iterator[StreamPiece]:
        cache = KVCache(self.config, len(prompt_ids) + config.max_tokens)  # all this generation needs
        yield from stream_pieces(self, prompt_ids, cache, config, constraint)

    def generate(self, prompt: Prompt, config: GenerationConfig | None = None, **options: Any) -> str:
        """Generate and return the whole completion (without stop ids or stop strings)."""
        return "".join(piece.text for piece in self.stream(prompt, config, **options))

    def chat(
        self,
        system: str | None = None,
        config: GenerationConfig | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_context: int | None = None,
        overflow: str = "error",
        **options: Any,
    ) -> ChatSession:
        """A chat session with its own KV cache, kept between turns; `options` are per-turn defaults."""
        return ChatSession(
            self,
            system,
            GenerationConfig.of(config, options),
            cache=self.new_cache(max_context),
            overflow=overflow,
            tools=tools,
        )

"""Chat sessions: a conversation and a KV cache kept between turns, so a turn prefills only what is new.

Each turn renders the whole conversation with the model's template and tokenizes it, then reuses the
longest prefix those ids share with the ids the cache holds. Normally that is everything up to the
last reply, so only the reply's `<|im_end|>`, the new message and the template's glue are prefilled.
Re-rendering (rather than appending ids) keeps the prompt exactly what the template says even when
re-tokenizing a reply gives other ids than the model generated: the cache is then rewound to where
they part. Editing or regenerating a turn rewinds the same way instead of starting over.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge_qwen.cache import KVCache
from edge_qwen.chat_template import check_messages
from edge_qwen.constraints import Constraint, compile_constraint, grammar_for
from edge_qwen.engine import Engine
from edge_qwen.errors import ContextFullError
from edge_qwen.generation import GenerationConfig, StreamPiece, stream_pieces
from edge_qwen.tool_calls import ToolCall, ToolCallStream, arguments_as_objects

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("error", "truncate-oldest")

Message = dict[str, Any]


@dataclass(frozen=True)
class TurnStats:
    """What one turn cost: tokens reused from the cache, prefilled and generated, and the times."""

    prompt_tokens: int  # the whole rendered conversation
    reused_tokens: int  # of those, already in the cache
    prefilled_tokens: int  # of those, run this turn (prompt_tokens - reused_tokens)
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str | None  # "stop", "length", "tool_calls", or "interrupted" when closed early
    dropped_messages: int = 0  # oldest messages dropped to fit the context (overflow="truncate-oldest")
    tool_calls: tuple[ToolCall, ...] = ()  # the answer's function calls (chats with tools)


class ChatSession:
    """A conversation with its own KV cache; made by `Model.chat`. One thread at a time per session.

    `overflow` chooses what happens when the conversation plus max_tokens outgrows the context:
    "error" (default) raises ContextFullError naming the numbers and leaves the session as it was;
    "truncate-oldest" keeps the system message and drops the oldest turns until it fits.
    """

    def __init__(
        self,
        model: Engine,
        system: str | None,
        config: GenerationConfig,
        cache: KVCache,
        overflow: str = "error",
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string, got {type(system).__name__}")
        self.model = model
        self.config = config
        self.cache = cache
        self.overflow = overflow
        self.tools = tools
        self._system: list[Message] = [] if system is None else [{"role": "system", "content": system}]
        self._messages: list[Message] = list(self._system)
        self.stats: list[TurnStats] = []

    @property
    def messages(self) -> list[Message]:
        """The conversation so far (a copy)."""
        return [dict(m) for m in self._messages]

    @property
    def last_stats(self) -> TurnStats | None:
        return self.stats[-1] if self.stats else None

    def stream(
        self, text: str | None, config: GenerationConfig | None = None, **options: Any
    ) -> Iterator[StreamPiece]:
        """Add a user message (None: reply to the conversation as it stands) and stream the reply.

        The conversation and the options are checked here (ContextFullError when it does not fit).
        The reply joins the conversation when the stream ends; a stream closed early keeps the reply
        so far, with finish_reason "interrupted" in its stats.
        """
        config = GenerationConfig.of(config if config is not None else self.config, options)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"a message must be a string, got {type(text).__name__}")
        if text is None and (not self._messages or self._messages[-1]["role"] == "assistant"):
            raise ValueError("nothing to reply to: the conversation does not end with a user message")
        new = [] if text is None else [{"role": "user", "content": text}]
        constraint = self._constraint(config)
        messages, prompt_ids, dropped = self._fit([*self._messages, *new], config.max_tokens)
        return self.model.serialized(self._turn(messages, prompt_ids, dropped, config, constraint))

    def stream_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        config: GenerationConfig | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> Iterator[StreamPiece]:
        """Replace the conversation by `messages` (and the tools by `tools`) and stream the reply.

        For a client that resends the whole conversation each turn, as OpenAI's API does: the cache
        is rewound to the longest prefix it shares with the new prompt, so only what is new is
        prefilled. The messages are checked here, before the first piece.
        """
        config = GenerationConfig.of(config if config is not None else self.config, options)
        conversation: list[Message] = [dict(m) for m in messages]
        if not conversation or conversation[-1].get("role") == "assistant":
            raise ValueError("nothing to reply to: the messages must end with a user or tool message")
        self.tools = tools
        constraint = self._constraint(config)
        fitted, prompt_ids, dropped = self._fit(conversation, config.max_tokens)
        return self.model.serialized(self._turn(fitted, prompt_ids, dropped, config, constraint))

    def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """Add a tool's result for the call `tool_call_id` of the last answer; reply with stream(None)."""
        if not isinstance(content, str):
            raise ValueError(f"a tool result must be a string (e.g. JSON text), got {type(content).__name__}")
        answers = [i for i, m in enumerate(self._messages) if m["role"] == "assistant"]
        after = self._messages[answers[-1] + 1 :] if answers else []
        asked = [c["id"] for c in self._messages[answers[-1]].get("tool_calls", ())] if answers else []
        if tool_call_id not in asked or any(m["role"] != "tool" for m in after):
            raise ValueError(f"no tool call {tool_call_id!r} to answer: the last answer called {asked}")
        self._messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": content})

    def send(self, text: str | None, config: GenerationConfig | None = None, **options: Any) -> str:
        """Add a user message and return the whole reply."""
        return "".join(piece.text for piece in self.stream(text, config, **options))

    def regenerate(self, config: GenerationConfig | None = None, **options: Any) -> str:
        """Replace the last reply with a new one; the cache rewinds to the end of the prompt."""
        if not self._messages or self._messages[-1]["role"] != "assistant":
            raise ValueError("nothing to regenerate: the conversation does not end with a reply")
        return self._resend(len(self._messages) - 1, None, config, options)

    def edit_last_user(self, text: str, config: GenerationConfig | None = None, **options: Any) -> str:
        """Replace the last user message (dropping what followed it) and return the new reply."""
        users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
        if not users:
            raise ValueError("no user message to edit")
        return self._resend(users[-1], text, config, options)

    def _resend(
        self, keep: int, text: str | None, config: GenerationConfig | None, options: dict[str, Any]
    ) -> str:
        """Cut the conversation to its first `keep` messages and send; on failure, restore it."""
        before = self._messages
        self._messages = before[:keep]
        try:
            return self.send(text, config, **options)
        except BaseException:
            self._messages = before
            raise

    def pop(self) -> Message:
        """Remove and return the last message (never the system message)."""
        if len(self._messages) <= len(self._system):
            raise ValueError("no message to remove: the conversation is empty")
        return self._messages.pop()

    def reset(self) -> None:
        """Back to the system message alone, with an empty cache."""
        self._messages = list(self._system)
        self.cache.reset()
        self.stats.clear()

    def _constraint(self, config: GenerationConfig) -> Constraint | None:
        """The turn's compiled constraint (response_format, regex, grammar or a required tool call)."""
        grammar = grammar_for(config, self.tools, self.model.tokenizer)
        return None if grammar is None else compile_constraint(self.model, grammar)

    def _turn(
        self,
        messages: list[Message],
        prompt_ids: list[int],
        dropped: int,
        config: GenerationConfig,
        constraint: Constraint | None,
    ) -> Iterator[StreamPiece]:
        reused = self.cache.rewind_to(prompt_ids)
        calls = ToolCallStream() if self.tools and config.tool_choice != "none" else None
        reply: list[str] = []
        last: StreamPiece | None = None
        finished = False
        try:
            for last in stream_pieces(self.model, prompt_ids, self.cache, config, constraint):
                if calls is not None:
                    last = _without_calls(last, calls)
                reply.append(last.text)
                yield last
            finished = True
        finally:
            if last is not None:  # a closed stream (GeneratorExit) keeps what it produced
                self._messages = [*messages, _answer("".join(reply), last.tool_calls)]
                reason = last.finish_reason if finished else "interrupted"
                self.stats.append(_stats(last, reused, reason, dropped))

    def _fit(self, messages: list[Message], max_tokens: int) -> tuple[list[Message], list[int], int]:
        """The messages that fit the context with max_tokens to spare, their ids, and how many dropped."""
        check_messages(messages)
        dropped = 0
        while True:
            ids = self.model.encode_prompt(arguments_as_objects(messages), tools=self.tools)
            if len(ids) + max_tokens <= self.cache.max_len:
                if dropped:
                    log.info("dropped the %d oldest messages to fit the context", dropped)
                return messages, ids, dropped
            n = _oldest_turn(messages) if self.overflow == "truncate-oldest" else 0
            if n == 0:
                raise ContextFullError(self._overflow_message(len(ids), max_tokens))
            first = 1 if messages[0]["role"] == "system" else 0
            messages = messages[:first] + messages[first + n :]
            dropped += n

    def _overflow_message(self, prompt_tokens: int, max_tokens: int) -> str:
        fix = (
            "lower max_tokens, or start a new chat with a larger max_context"
            if self.overflow == "truncate-oldest"
            else "reset() the session, lower max_tokens, or chat(overflow='truncate-oldest')"
        )
        what = (
            "even cut to its last turn, the conversation"
            if self.overflow == "truncate-oldest"
            else ("the conversation")
        )
        return (
            f"{what} is {prompt_tokens} tokens; with max_tokens {max_tokens} that is "
            f"{prompt_tokens + max_tokens} > the context of {self.cache.max_len} tokens: {fix}"
        )


def _oldest_turn(messages: list[Message]) -> int:
    """How many messages the oldest turn (a user message and the replies up to the next one) spans.

    0 when the oldest turn is the last one, which is never dropped.
    """
    first = 1 if messages and messages[0]["role"] == "system" else 0
    for n, message in enumerate(messages[first + 1 :], start=1):
        if message["role"] == "user":
            return n
    return 0


def _without_calls(piece: StreamPiece, calls: ToolCallStream) -> StreamPiece:
    """The piece with tool-call text held back; the last piece carries the parsed calls."""
    text = calls.push(piece.text)
    if piece.finish_reason is None:
        return replace(piece, text=text)
    tail, found = calls.finish()
    reason = "tool_calls" if found else piece.finish_reason
    return replace(piece, text=text + tail, tool_calls=found, finish_reason=reason)


def _answer(text: str, calls: tuple[ToolCall, ...]) -> Message:
    """The assistant message for an answer, in OpenAI's shape when it calls tools."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": [c.message() for c in calls]}


def _stats(last: StreamPiece, reused: int, finish_reason: str | None, dropped: int) -> TurnStats:
    return TurnStats(
        prompt_tokens=last.prompt_tokens,
        reused_tokens=reused,
        prefilled_tokens=last.prompt_tokens - reused,
        generated_tokens=last.generated_tokens,
        prefill_seconds=last.prefill_seconds,
        decode_seconds=last.decode_seconds,
        finish_reason=finish_reason,
        dropped_messages=dropped,
        tool_calls=last.tool_calls,
    )

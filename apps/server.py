"""The OpenAI-compatible endpoints over one loaded model: what each route does with a checked request.

The HTTP layer (apps/server_http.py) reads and answers; the request shapes are in
apps/server_openai.py; the queue and the KV cache pool in apps/server_pool.py. Here a request waits
its turn, takes the cache that shares the most with its prompt, and streams its pieces back, stopping
within one token when the client goes away or its deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from edge_qwen.apps.server_openai import (
    ChatRequest,
    Limits,
    RequestError,
    chat_chunk,
    chat_response,
    completion_response,
    models_response,
    new_id,
    parse_chat,
    parse_completion,
    tool_calls_delta,
    usage,
    usage_chunk,
)
from edge_qwen.apps.server_pool import CachePool, FairQueue, QueueFull, QueueTimeout
from edge_qwen.cache import KVCache, common_prefix_len
from edge_qwen.chat_template import check_messages
from edge_qwen.errors import EdgeQwenError, InsufficientMemoryError
from edge_qwen.generation import GenerationConfig, StreamPiece, stream_pieces
from edge_qwen.model import Model
from edge_qwen.session import ChatSession
from edge_qwen.tool_calls import ToolCall, arguments_as_objects

T = TypeVar("T")


class Exchange(Protocol):
    """One request's answer channel (apps/server_http.py): JSON, or server-sent events."""

    deadline: float  # time.monotonic() by which the request must be done
    tokens: tuple[int, int, int] | None  # prompt, cached, generated: for the log line

    def json(self, status: int, body: dict[str, Any]) -> None: ...
    def start_events(self) -> None: ...
    def event(self, body: dict[str, Any]) -> None: ...
    def done(self) -> None: ...
    def client_gone(self) -> bool: ...


@dataclass
class Outcome:
    rid: str
    text: str
    finish_reason: str
    generated: int
    tool_calls: tuple[ToolCall, ...] = ()


class OpenAIApp:
    """The routes, over one model, one queue and one cache pool."""

    def __init__(self, model: Model, name: str, pool: CachePool, queue: FairQueue, limits: Limits) -> None:
        self.model = model
        self.name = name
        self.pool = pool
        self.queue = queue
        self.limits = limits
        self.started = int(time.time())
        self.routes = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
        }

    def health(self, ex: Exchange, body: Any) -> None:
        ex.json(200, {"status": "ok", "model": self.name, "waiting": self.queue.waiting})

    def models(self, ex: Exchange, body: Any) -> None:
        ex.json(200, models_response([self.name], self.started))

    def chat(self, ex: Exchange, body: Any) -> None:
        request = parse_chat(body, self.limits)
        with self._turn(ex):
            prompt_ids = self._checked(lambda: self._chat_ids(request), "messages")
            cache = self._checked(lambda: self.pool.take(prompt_ids))
            config = self._fit(request, len(prompt_ids), cache)
            session = ChatSession(self.model, None, config, cache=cache)
            pieces = self._checked(
                lambda: session.stream_messages(request.messages, config, tools=request.tools)
            )
            outcome = self._respond(ex, request, pieces, "chat.completion.chunk")
            stats = session.last_stats
            cached = stats.reused_tokens if stats is not None else 0
        self._finish(ex, request, outcome, len(prompt_ids), cached, "chat.completion.chunk")

    def completions(self, ex: Exchange, body: Any) -> None:
        request = parse_completion(body, self.limits)
        prompt = request.prompt or ""
        with self._turn(ex):
            prompt_ids = self._checked(lambda: self.model.encode_prompt(prompt, chat=False), "prompt")
            cache = self._checked(lambda: self.pool.take(prompt_ids))
            config = self._fit(request, len(prompt_ids), cache)
            cached = min(common_prefix_len(cache.tokens, prompt_ids), len(prompt_ids) - 1)
            pieces = self.model.serialized(stream_pieces(self.model, prompt_ids, cache, config))
            outcome = self._respond(ex, request, pieces, "text_completion")
        self._finish(ex, request, outcome, len(prompt_ids), cached, "text_completion")

    def _chat_ids(self, request: ChatRequest) -> list[int]:
        """The prompt's ids as the session will render them: the pool picks a cache by them."""
        messages = arguments_as_objects(check_messages(request.messages))
        return self.model.encode_prompt(messages, tools=request.tools)

    @contextmanager
    def _turn(self, ex: Exchange) -> Iterator[None]:
        try:
            with self.queue.turn(ex.deadline):
                if ex.client_gone():  # it left while waiting: nothing to prefill for
                    raise RequestError("the client closed the connection while waiting", status=499)
                yield
        except QueueFull as e:
            raise RequestError(
                f"the server is busy ({e}): retry later", status=429, kind="rate_limit_error"
            ) from None
        except QueueTimeout as e:
            raise RequestError(str(e), status=503) from None

    @staticmethod
    def _checked(call: Callable[[], T], param: str | None = None) -> T:
        """Library errors about the request (a template's refusal, a schema it cannot compile) become
        400s; a KV cache the memory cannot hold now, a 503."""
        try:
            return call()
        except InsufficientMemoryError as e:
            raise RequestError(str(e), status=503) from None
        except (EdgeQwenError, ValueError) as e:
            raise RequestError(str(e), param) from None

    def _fit(self, request: ChatRequest, prompt_tokens: int, cache: KVCache) -> GenerationConfig:
        """The request's config; an omitted max_tokens shrinks to the room the context leaves."""
        room = cache.max_len - prompt_tokens
        if room < 1 or (request.max_tokens_given and request.config.max_tokens > room):
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens; with max_tokens {request.config.max_tokens} it "
                f"exceeds the context of {cache.max_len} tokens: shorten the conversation or lower "
                "max_tokens",
                "messages",
            )
        return GenerationConfig.of(request.config, {"max_tokens": min(request.config.max_tokens, room)})

    def _respond(
        self, ex: Exchange, request: ChatRequest, pieces: Iterator[StreamPiece], kind: str
    ) -> Outcome:
        """Run the generation, streaming each piece when asked; stops when the client goes or time is up."""
        rid = new_id("chatcmpl" if kind.startswith("chat") else "cmpl")
        text: list[str] = []
        last: StreamPiece | None = None
        finish = "length"
        if request.stream:
            ex.start_events()
            if kind.startswith("chat"):
                ex.event(
                    chat_chunk(rid, self.name, {"role": "assistant", "content": ""}, None) | {"usage": None}
                )
        try:
            for last in pieces:
                if last.text:
                    text.append(last.text)
                    if request.stream:
                        ex.event(self._delta(rid, kind, last.text, None, request))
                if last.finish_reason is not None:
                    finish = last.finish_reason  # the last piece: the generator ends after it
                elif ex.client_gone() or time.monotonic() > ex.deadline:
                    break  # "length": cut short
        finally:
            if isinstance(pieces, Generator):
                pieces.close()  # GeneratorExit stops the step generator and releases the model
        generated = last.generated_tokens if last is not None else 0
        calls = last.tool_calls if last is not None else ()
        return Outcome(rid, "".join(text), finish, generated, calls)

    def _delta(
        self, rid: str, kind: str, text: str, finish: str | None, request: ChatRequest
    ) -> dict[str, Any]:
        if kind.startswith("chat"):
            chunk = chat_chunk(rid, self.name, {"content": text} if text else {}, finish)
        else:
            chunk = completion_response(rid, self.name, text, finish, None)
        return chunk | {"usage": None} if request.include_usage else chunk

    def _finish(
        self, ex: Exchange, request: ChatRequest, out: Outcome, prompt: int, cached: int, kind: str
    ) -> None:
        ex.tokens = (prompt, cached, out.generated)
        use = usage(prompt, cached, out.generated)
        rid = out.rid
        if ex.client_gone():
            return
        if request.stream:
            if out.tool_calls:
                ex.event(chat_chunk(rid, self.name, tool_calls_delta(out.tool_calls), None))
            ex.event(self._delta(rid, kind, "", out.finish_reason, request))
            if request.include_usage:
                ex.event(usage_chunk(rid, self.name, kind, use))
            ex.done()
        elif kind.startswith("chat"):
            ex.json(200, chat_response(rid, self.name, out.text, out.tool_calls, out.finish_reason, use))
        else:
            ex.json(200, completion_response(rid, self.name, out.text, out.finish_reason, use))

"""OpenAI's request and response shapes: JSON bodies in, GenerationConfig and messages out, and back.

Fields follow OpenAI's API reference for /v1/chat/completions and /v1/completions, plus the sampler
fields llama-server and vLLM accept (top_k, min_p, repetition_penalty). response_format and
tools / tool_choice go to the runtime's structured output (docs/structured.md). A field that only
describes the caller (user, metadata, store) is ignored; a field whose request we cannot honour
(logprobs, n > 1, logit_bias) is a 400 naming it, and so is an unknown field ("Unrecognized request
argument supplied", OpenAI's answer).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_qwen.generation import GenerationConfig
from edge_qwen.tool_calls import ToolCall

# The model's own recommended sampling (Qwen2.5's generation_config.json), used for omitted fields.
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}

SAMPLER_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls"})
CHAT_FIELDS = frozenset(
    {
        *SAMPLER_FIELDS,
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "n",
        "stream",
        "stream_options",
        "response_format",
        "tools",
        "tool_choice",
        "logprobs",
        "top_logprobs",
        "logit_bias",
    }
)
COMPLETION_FIELDS = frozenset(
    {*SAMPLER_FIELDS, "prompt", "max_tokens", "stop", "n", "stream", "stream_options", "echo"}
    | {"logprobs", "suffix", "best_of", "logit_bias"}
)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP = 4  # OpenAI's bound


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "") -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 1024
    max_messages: int = 256


@dataclass(frozen=True)
class ChatRequest:
    """A checked /v1/chat/completions request (or a /v1/completions one: `prompt` set, no messages)."""

    config: GenerationConfig
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] | None = None
    max_tokens_given: bool = False


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    """A chat completion request checked field by field; RequestError naming the first bad one."""
    body = _object(body)
    _known_fields(body, CHAT_FIELDS)
    _refuse(body, "logprobs", "top_logprobs", "logit_bias")
    tools = _tools(body)
    messages = [_message(m, i) for i, m in enumerate(_list(body, "messages", required=True))]
    if not messages:
        raise RequestError("messages must hold at least one message", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"too many messages: {len(messages)} > {limits.max_messages}", "messages")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream, include_usage = _streaming(body)
    config = _config(body, limits, max_name, default_max=limits.max_tokens)
    structured = {
        name: body[name] for name in ("response_format", "tool_choice") if body.get(name) is not None
    }
    for name, value in structured.items():
        try:
            config = GenerationConfig.of(config, {name: value})
        except ValueError as e:
            raise RequestError(str(e), name) from None
    return ChatRequest(
        config=config,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        tools=tools,
        max_tokens_given=body.get(max_name) is not None,
    )


def parse_completion(body: Any, limits: Limits) -> ChatRequest:
    """A /v1/completions request: one prompt string in, text out."""
    body = _object(body)
    _known_fields(body, COMPLETION_FIELDS)
    _refuse(body, "logprobs", "suffix", "logit_bias")
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("best_of") not in (None, 1):
        raise RequestError("best_of must be 1: this server returns one completion", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string (or a list of one)", "prompt")
    stream, include_usage = _streaming(body)
    return ChatRequest(
        config=_config(body, limits, "max_tokens", default_max=16),  # OpenAI's default for completions
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
        max_tokens_given=body.get("max_tokens") is not None,
    )


def _config(body: Mapping[str, Any], limits: Limits, max_name: str, default_max: int) -> GenerationConfig:
    if body.get("n") not in (None, 1):
        raise RequestError("n must be 1: this server returns one choice", "n")
    max_tokens = body.get(max_name)
    if max_tokens is None:
        max_tokens = default_max
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"{max_name} must be an integer >= 1, got {max_tokens!r}", max_name)
    if max_tokens > limits.max_tokens:
        raise RequestError(f"{max_name} must be at most {limits.max_tokens}, got {max_tokens}", max_name)
    sampling = {name: body[name] for name in SAMPLER_FIELDS if body.get(name) is not None}
    temperature = sampling.get("temperature")
    if isinstance(temperature, int | float) and not 0 <= temperature <= 2:  # OpenAI's range
        raise RequestError(f"temperature must be in [0, 2], got {temperature!r}", "temperature")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    try:
        return GenerationConfig(**{**DEFAULT_SAMPLING, **sampling}, max_tokens=max_tokens, stop=tuple(stop))
    except (ValueError, TypeError) as e:  # the sampler's own check names the field: "top_p must be ..."
        raise RequestError(str(e), str(e).split(" ", 1)[0]) from None


def _streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError('stream_options must be an object like {"include_usage": true}', "stream_options")
    return True, bool(options.get("include_usage", False))


def _message(message: Any, i: int) -> dict[str, Any]:
    """One message in the template's shape: role and text content (text parts joined)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with a role and content", where)
    role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise RequestError(
            f"{where}.role must be one of {', '.join(ROLES)}, got {message.get('role')!r}", where
        )
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{where}.content") for part in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]  # checked where the template renders them
        out["content"] = content or None
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise RequestError(f"{where}.tool_call_id must name the call it answers", f"{where}.tool_call_id")
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Function tools, as OpenAI sends them ({"type": "function", "function": {...}})."""
    if body.get("tools") is None:
        return None
    tools = _list(body, "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise RequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools"
            )
    return tools


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise RequestError(f"{where}: only text parts are supported, got {kind!r}", where)
    return str(part["text"])


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _known_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known and name not in IGNORED:
            raise RequestError(f"Unrecognized request argument supplied: {name}", name)


def _refuse(body: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, False, 0, {}):
            raise RequestError(f"{name} is not supported by this server", name)


def _list(body: Mapping[str, Any], name: str, required: bool = False) -> list[Any]:
    value = body.get(name)
    if value is None and required:
        raise RequestError(f"missing required field {name}", name)
    if not isinstance(value, list):
        raise RequestError(f"{name} must be a list, got {type(value).__name__}", name)
    return value


def _is_text(response_format: Any) -> bool:
    return isinstance(response_format, dict) and response_format.get("type") == "text"


# -- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, cached: int, generated: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_response(
    rid: str, model: str, text: str, calls: Sequence[ToolCall], finish_reason: str, use: dict[str, Any]
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": [c.message() for c in calls]}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(rid, "chat.completion", model) | {"choices": [choice], "usage": use}


def tool_calls_delta(calls: Sequence[ToolCall]) -> dict[str, Any]:
    """A stream chunk's delta carrying an answer's tool calls, each whole, with its index."""
    return {"tool_calls": [{"index": i, **c.message()} for i, c in enumerate(calls)]}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(rid, "chat.completion.chunk", model) | {"choices": [choice]}


def completion_response(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict[str, Any] | None
) -> dict[str, Any]:
    """A /v1/completions body, or one of its stream chunks (use None while streaming)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = _envelope(rid, "text_completion", model) | {"choices": [choice]}
    return body | {"usage": use} if use is not None else body


def usage_chunk(rid: str, model: str, kind: str, use: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the whole request's usage."""
    return _envelope(rid, kind, model) | {"choices": [], "usage": use}


def models_response(names: Sequence[str], created: int) -> dict[str, Any]:
    data = [{"id": n, "object": "model", "created": created, "owned_by": "edge-qwen"} for n in names]
    return {"object": "list", "data": data}


def _envelope(rid: str, kind: str, model: str) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model}

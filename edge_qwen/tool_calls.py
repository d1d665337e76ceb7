"""Qwen2.5's tool calls as data: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in an
answer become `ToolCall`s, and the text a user sees leaves them out.

Qwen2.5's template lists the tools in the system prompt and asks for one such block per call; several
calls come as consecutive blocks. A block that does not parse (an unconstrained answer may break the
format) stays in the text as it was, with a logged warning: the caller gets the model's words rather
than an exception.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One function call of an answer, as OpenAI's API sends it: `arguments` is the JSON text."""

    id: str  # "call_<hex>", unique per call
    name: str
    arguments: str

    def message(self) -> dict[str, Any]:
        """The call as an entry of an assistant message's `tool_calls` (OpenAI's shape)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tool_calls(text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """Split an answer into its plain text and its tool calls; malformed blocks stay in the text."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    end = 0
    for block in _BLOCK.finditer(text):
        call = _parse_block(block.group(1))
        kept.append(text[end : block.start()] if call is not None else text[end : block.end()])
        if call is not None:
            calls.append(call)
        end = block.end()
    tail = text[end:]
    if OPEN in tail:
        log.warning("the answer holds an unclosed %s block; it is kept as text", OPEN)
    kept.append(tail)
    plain = "".join(kept)
    return (plain.strip() if calls else plain), tuple(calls)


def _parse_block(body: str) -> ToolCall | None:
    """The call a block holds, or None (with a warning) when it is not {"name": str, "arguments": ...}."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        log.warning("a %s block is not JSON (%s); it is kept as text: %.80r", OPEN, e.msg, body)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        log.warning("a %s block has no function name; it is kept as text: %.80r", OPEN, body)
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some answers send the arguments already as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            log.warning("a %s block's arguments are not JSON; it is kept as text: %.80r", OPEN, body)
            return None
    if not isinstance(arguments, dict):
        log.warning("a %s block's arguments are not an object; it is kept as text: %.80r", OPEN, body)
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{secrets.token_hex(12)}", name=data["name"], arguments=text)


def arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each tool call's JSON-text `arguments` (OpenAI's shape) parsed into objects.

    Qwen2.5's template writes `arguments | tojson` into the `<tool_call>` block: given the object it
    writes what the model generated, so the next turn reuses the cache; given the text it would
    write a quoted string the model never saw (as transformers does; vLLM parses them first, too).
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _with_object_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("arguments"), str)):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: the template shows the text as it is
    return {**call, "function": {**function, "arguments": arguments}}


class ToolCallStream:
    """Streams an answer's text while holding back everything from the first `<tool_call>` on.

    `push` returns the text safe to show now (a tail that could begin `<tool_call>` waits for the
    next piece); `finish` parses what was held back and returns the rest of the text (malformed
    blocks, anything after the calls) and the calls.
    """

    def __init__(self) -> None:
        self._pending = ""  # a tail that may be the start of <tool_call>
        self._held: str | None = None  # everything from the first <tool_call> on, once seen

    def push(self, text: str) -> str:
        if self._held is not None:
            self._held += text
            return ""
        buffer = self._pending + text
        start = buffer.find(OPEN)
        if start >= 0:
            self._held, self._pending = buffer[start:], ""
            return buffer[:start].rstrip()  # the whitespace that led up to the call goes with it
        partial = next(
            (n for n in range(min(len(OPEN) - 1, len(buffer)), 0, -1) if buffer.endswith(OPEN[:n])), 0
        )
        shown = buffer[: len(buffer) - partial].rstrip()  # whitespace waits: it may precede a call
        self._pending = buffer[len(shown) :]
        return shown

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        if self._held is None:
            pending, self._pending = self._pending, ""
            return pending, ()
        return parse_tool_calls(self._held)

"""The model's own Jinja chat template, rendered in a sandbox exactly as transformers renders it.

Templates come with downloaded models, so they run in jinja2's immutable sandbox: a template can
neither reach Python internals (`''.__class__`, function globals) nor mutate what it is given. The
environment matches transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, a
non-escaping `tojson`, `raise_exception`, `strftime_now`), so a prompt renders to the same string here
as in transformers, with no transformers installed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from edge_qwen.errors import EdgeQwenError

if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

# jinja2 is imported when a template is first compiled, not with this module: a process that only
# runs token ids (edge-qwen bench, a raw completion) does not pay its ~7 MB (docs/memory.md).

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(EdgeQwenError, ValueError):
    """A chat template does not compile, fails while rendering, or rejects the messages it was given."""


def _raise_exception(message: str) -> NoReturn:
    # Templates call raise_exception('...') to reject a conversation they cannot format.
    raise ChatTemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's own tojson, no HTML escaping and non-ASCII text kept as is, as in transformers.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


# The most a template's `*` may make (characters or items) and the largest exponent of its `**`: real
# chat templates repeat a few spaces; `'a' * 10**10` would take the process's memory.
MAX_REPEAT = 1_000_000
MAX_EXPONENT = 64


def _sandbox() -> ImmutableSandboxedEnvironment:
    """A jinja2 environment with the filters and globals chat templates expect.

    No loader: `include`, `import` and `extends` find no template (TemplateNotFound), so a template
    reads no file. `*` and `**` are bounded (jinja2's intercepted_binops), as `range` already is.
    """
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
            counts = [abs(v) for v in (left, right) if isinstance(v, int)]
            if operator == "*" and sizes and counts and sizes[0] * counts[0] > MAX_REPEAT:
                raise SecurityError(f"the template repeats a value {counts[0]} times (at most {MAX_REPEAT})")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"the template raises to the power {right} (at most {MAX_EXPONENT})")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
        loader=jinja2.DictLoader({}),
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to."""

    def __init__(self, template: str, bos_token: str | None, eos_token: str | None) -> None:
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"chat template must be a non-empty string, got {template!r:.80}")
        self.bos_token = bos_token
        self.eos_token = eos_token
        import jinja2

        try:
            self._template = _sandbox().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template does not compile: {exc.message} (line {exc.lineno})"
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt for a conversation, as transformers' apply_chat_template(tokenize=False) renders it."""
        context: dict[str, Any] = {
            "messages": check_messages(messages),
            "tools": _check_tools(tools),
            "documents": None,  # transformers always passes it; a template may test `documents is none`
            "add_generation_prompt": add_generation_prompt,
        }
        # transformers passes the special tokens that are set, and only those.
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        import jinja2

        try:
            return self._template.render(context)
        except (jinja2.TemplateError, OverflowError) as exc:  # SecurityError, UndefinedError, big range()
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate a conversation; return it as plain JSON-like data without None-valued keys.

    Keys set to None are dropped, as transformers does, so an OpenAI-style assistant turn with
    `content=None` and `tool_calls=[...]` renders as if content were absent.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} mappings, got {messages!r:.80}"
        )
    if not messages:
        raise ValueError("messages must not be empty")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a mapping with 'role' and 'content', got {message!r:.80}"
            )
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"messages[{i}] ({role}) has no content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) content must be a string, got {type(content).__name__}")
        checked.append(_plain(message, f"messages[{i}]"))
    return checked


def _check_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    """Tools as plain JSON-like data (function schemas), or None."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of function schemas, got {tools!r:.80}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a mapping (a JSON function schema), got {tool!r:.80}")
    return _plain(list(tools), "tools")


def _plain(value: Any, where: str) -> Any:
    """A deep copy made of dict, list, str, int, float, bool and None only.

    The template then sees no caller objects whose methods the sandbox does not know about, and
    cannot observe subclasses (enums, numpy scalars) that would render differently.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # the bare string, whatever a subclass's __str__ says
    if isinstance(value, bool):  # before int: bool is an int
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(key, where): _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where} holds a {type(value).__name__}; chat messages may hold only JSON-like values")

"""Constrained decoding: the tokens that can continue a valid output, as a mask the sampler applies.

A constraint is a JSON schema (OpenAI's `response_format`), a regular expression or a Lark grammar,
compiled by llguidance against the package's own tokenizer.json. At each step the matcher computes
which of the vocabulary's tokens keep the output valid (a bitmask, a few microseconds to a few hundred
for Qwen2.5's 151,936 tokens), the sampler masks the rest before penalties, temperature, top-k and
top-p, and the matcher then consumes the token drawn. Once the output is complete the matcher allows
only a stop token, and generation ends there.

llguidance is imported when a constraint is first compiled, so unconstrained generation never loads it.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edge_qwen.sampling import Sampler

if TYPE_CHECKING:
    import llguidance
    from tokenizers import Tokenizer

    from edge_qwen.engine import Engine

RESPONSE_TYPES = ("text", "json_object", "json_schema")
# JSON comes on one line with ", " and ": " between items (as json.dumps writes it): whitespace the
# model may choose freely lets a small model pad forever instead of closing the object, and
# llguidance 1.6 (its newest aarch64 wheel on the index) ignores a bounded whitespace pattern.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CHOICES = ("auto", "none", "required")

# Parsing tokenizer.json into llguidance's trie takes seconds for Qwen2.5's vocabulary: once per engine.
_TOKENIZERS: weakref.WeakKeyDictionary[Engine, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


def check_response_format(response_format: Mapping[str, Any] | None) -> None:
    """ValueError naming the problem when response_format is not one of OpenAI's three shapes."""
    if response_format is None:
        return
    if not isinstance(response_format, Mapping) or response_format.get("type") not in RESPONSE_TYPES:
        raise ValueError(
            f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, "
            f"got {response_format!r:.100}"
        )
    if response_format["type"] == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise ValueError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}, "
                f"got {response_format!r:.100}"
            )


def check_tool_choice(tool_choice: object) -> None:
    """ValueError unless tool_choice is "auto", "none", "required" or {"type": "function", ...}."""
    if isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES:
        return
    if isinstance(tool_choice, Mapping) and isinstance(forced_tool_name(tool_choice), str):
        return
    raise ValueError(
        "tool_choice must be 'auto', 'none', 'required' or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r:.100}"
    )


def forced_tool_name(tool_choice: object) -> str | None:
    """The function a {"type": "function", "function": {"name": ...}} tool_choice names, else None."""
    if not isinstance(tool_choice, Mapping):
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if tool_choice.get("type") == "function" and isinstance(name, str) else None


class ConstraintOptions(Protocol):
    """The constraint fields of a generation's options (GenerationConfig), named here so that this
    module, below generation.py, does not import it."""

    @property
    def response_format(self) -> Mapping[str, Any] | None: ...

    @property
    def regex(self) -> str | None: ...

    @property
    def grammar(self) -> str | None: ...

    @property
    def tool_choice(self) -> str | Mapping[str, Any]: ...


def grammar_for(
    config: ConstraintOptions,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tokenizer: Tokenizer | None = None,
) -> str | None:
    """The llguidance grammar a generation must follow (None: unconstrained).

    `tokenizer` tells whether `<tool_call>` is one token of the vocabulary (as in Qwen2.5's).
    """
    import llguidance

    forced = _forced_tool_grammar(config.tool_choice, tools, tokenizer)
    wanted = [
        ("response_format", _response_grammar(config.response_format)),
        ("regex", None if config.regex is None else llguidance.LLMatcher.grammar_from_regex(config.regex)),
        (
            "grammar",
            None if config.grammar is None else llguidance.LLMatcher.grammar_from_lark(config.grammar),
        ),
        ("tool_choice", forced),
    ]
    given = [(name, grammar) for name, grammar in wanted if grammar is not None]
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        raise ValueError(f"{names} each constrain the output: give only one of them")
    return given[0][1] if given else None


def _response_grammar(response_format: Mapping[str, Any] | None) -> str | None:

    kind = None if response_format is None else response_format["type"]
    if kind == "json_object":
        return _json_grammar({"type": "object"})
    if kind == "json_schema":
        assert response_format is not None
        return _json_grammar(dict(response_format["json_schema"]["schema"]))
    return None


def _json_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    # llguidance's stubs type the options as a TypedDict it does not export
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)  # type: ignore[arg-type]


def _forced_tool_grammar(
    tool_choice: object, tools: Sequence[Mapping[str, Any]] | None, tokenizer: Tokenizer | None
) -> str | None:
    """A Lark grammar of Qwen2.5's tool-call blocks when tool_choice requires a call, else None.

    Each block is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the arguments held
    to the function's `parameters` schema. The answer is exactly one call: of any tool for
    "required", of the named function otherwise. (A small model, let free to add calls, tends to
    repeat them until max_tokens; "auto" leaves several calls possible.)
    """
    name = forced_tool_name(tool_choice)
    if tool_choice in ("auto", "none") or (name is None and tool_choice != "required"):
        return None
    functions = [_function(tool) for tool in tools or ()]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    if not functions:
        raise ValueError("tool_choice 'required' needs tools: pass tools=[...] to the chat")
    calls = [_call_schema(f) for f in functions]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = json.dumps({**call, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)
    open_, close = _literal(tokenizer, "<tool_call>"), _literal(tokenizer, "</tool_call>")
    lark = f'start: {open_} "\\n" body "\\n" {close}\nbody: %json {schema}\n'
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def _literal(tokenizer: Tokenizer | None, text: str) -> str:
    """`text` in Lark: the special token itself when the vocabulary has one (llguidance's `<[id]>`)."""
    token = None if tokenizer is None else tokenizer.token_to_id(text)
    return json.dumps(text) if token is None else f"<[{token}]>"


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function schema of an OpenAI-style tool ({"type": "function", "function": {...}}) or a bare one."""
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            f"a tool must name its function ({{'function': {{'name': ...}}}}), got {tool!r:.100}"
        )
    return function


def _call_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


class Constraint:
    """One generation's matcher: the allowed next tokens, and whether the output is complete."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = np.full((vocab_size + 31) // 32, -1, np.int32)  # one bit per token

    def allowed(self) -> np.ndarray:
        """A (vocab,) bool array of the tokens that keep the output valid."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask[None])
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(np.bool_)

    def advance(self, token: int) -> None:
        """Consume the token drawn; RuntimeError if it was not allowed (a bug, never the model's)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"constraint rejected token {token}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """True when nothing can be added to the output: only a stop token is allowed next."""
        return bool(self._matcher.is_stopped())


class ConstrainedSampler(Sampler):
    """A sampler that masks the tokens a constraint forbids before anything else, then advances it."""

    def __init__(self, sampler: Sampler, constraint: Constraint) -> None:
        super().__init__(sampler.config)
        self.constraint = constraint

    def __call__(
        self,
        logits: np.ndarray,
        history: Sequence[int] | np.ndarray = (),
        *,
        prompt_len: int = 0,
        allowed: np.ndarray | None = None,
    ) -> int:
        mask = self.constraint.allowed()
        if allowed is not None:
            mask = mask & allowed
        token = super().__call__(logits, history, prompt_len=prompt_len, allowed=mask)
        self.constraint.advance(token)
        return token


def compile_constraint(engine: Engine, grammar: str) -> Constraint:
    """A fresh matcher of `grammar` over the engine's tokenizer; ValueError naming what cannot compile."""
    import llguidance

    tokenizer = guidance_tokenizer(engine)
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(
            f"the output constraint cannot be compiled: {_first_line(matcher.get_error())}; "
            "remove or rewrite that part of the schema, regex or grammar"
        )
    return Constraint(matcher, engine.config.vocab_size)


def guidance_tokenizer(engine: Engine) -> llguidance.LLTokenizer:
    """llguidance's view of the package's tokenizer.json, made once per engine.

    Its end-of-sequence token is one of the package's stop ids (the template's eos_token when it is
    one, `<|im_end|>` for Qwen2.5 Instruct), so an output that ends early on it stops generation.
    One token, not a list: llguidance's aarch64 wheels on the index (1.6) take a single id.
    """
    tokenizer = _TOKENIZERS.get(engine)
    if tokenizer is None:
        import llguidance

        text = (engine.path / "tokenizer.json").read_text(encoding="utf-8")
        eos_text = engine.tokenizer_config.get("eos_token")
        eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
        eos = engine.tokenizer.token_to_id(eos_text) if isinstance(eos_text, str) else None
        if eos not in engine.stop_token_ids:
            eos = min(engine.stop_token_ids)
        tokenizer = llguidance.LLTokenizer(text, n_vocab=engine.config.vocab_size, eos_token=eos)
        _TOKENIZERS[engine] = tokenizer
    return tokenizer


def _first_line(error: str) -> str:
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return "; ".join(lines[:3]) if lines else "unknown error"

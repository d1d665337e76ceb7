"""From token ids to streamed text: generation options, stop strings, and the pieces `stream` yields."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from edge_qwen.cache import KVCache
from edge_qwen.constraints import ConstrainedSampler, Constraint, check_response_format, check_tool_choice
from edge_qwen.detokenize import StreamDecoder
from edge_qwen.engine import Engine
from edge_qwen.sampling import Sampler, SamplerConfig
from edge_qwen.tool_calls import ToolCall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig(SamplerConfig):
    """Options of one generation: the sampler's, plus how long it may run and where it stops.

    `stop` strings may span tokens; the text never includes them. `stop_ids` add to the package's
    own stop ids (`<|im_end|>`, `<|endoftext|>`).

    Constraints (docs/structured.md), at most one per generation: `response_format` in OpenAI's
    shapes ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {...}}}),
    a `regex`, or a Lark `grammar`. `tool_choice` ("auto", "none", "required" or
    {"type": "function", "function": {"name": ...}}) applies to chats with tools.
    """

    max_tokens: int = 256
    stop: Sequence[str] = ()  # kept as a tuple
    stop_ids: Sequence[int] = ()  # kept as a tuple
    response_format: Mapping[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    tool_choice: str | Mapping[str, Any] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)  # a list or a single string becomes a tuple
        stop_ids = tuple(self.stop_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop_ids):
            raise ValueError(f"stop_ids must be token ids (integers >= 0), got {self.stop_ids!r}")
        object.__setattr__(self, "stop_ids", stop_ids)
        check_response_format(self.response_format)
        check_tool_choice(self.tool_choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r:.80}")

    @classmethod
    def of(cls, config: GenerationConfig | None, options: Mapping[str, Any]) -> GenerationConfig:
        """`config` (default: the defaults) with the named options replaced, validated."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"unknown generation option {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return replace(config if config is not None else cls(), **options)

    def sampler(self) -> Sampler:
        """A fresh sampler (with its own seeded generator) for these options."""
        return Sampler(SamplerConfig(**{f.name: getattr(self, f.name) for f in fields(SamplerConfig)}))


@dataclass(frozen=True)
class StreamPiece:
    """One step of `stream`: new text (possibly empty) and where generation stands."""

    text: str
    token_id: int | None
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str | None = None  # None while generating, then "stop", "length" or "tool_calls"
    tool_calls: tuple[ToolCall, ...] = ()  # on a chat turn's last piece: the answer's function calls

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class StopStrings:
    """Finds stop strings in streamed text, holding back any tail that could start one.

    Text is released only once no stop string can begin in it, so a stop string spanning several
    pieces is still caught and never shown, and the released text is exactly what precedes the first
    stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string has now appeared)."""
        held = self._held + text
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return held[: min(found)], True
        keep = self._partial_tail(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of generation without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """The length of the longest tail of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


def stream_pieces(
    engine: Engine,
    prompt_ids: list[int],
    cache: KVCache,
    config: GenerationConfig,
    constraint: Constraint | None = None,
) -> Iterator[StreamPiece]:
    """Generate after `prompt_ids` (reusing what `cache` holds of them), yielding one piece per token.

    With a constraint, every token keeps the output valid and generation stops once it is complete.
    """
    stop_ids = engine.stop_token_ids | frozenset(config.stop_ids)
    sampler = config.sampler() if constraint is None else ConstrainedSampler(config.sampler(), constraint)
    tokens = engine.generate_tokens(prompt_ids, sampler, config.max_tokens, cache, stop_ids)
    decoder = StreamDecoder(engine.tokenizer)
    stops = StopStrings(config.stop)
    start = time.perf_counter()
    first_token_at = start
    for n, token in enumerate(tokens, start=1):
        now = time.perf_counter()
        first_token_at = now if n == 1 else first_token_at
        at_stop_id = token in stop_ids
        text, at_stop_string = stops.push("" if at_stop_id else decoder.push(token))
        # A complete constrained output ends here: its stop token would cost one more step.
        done = at_stop_id or at_stop_string or (constraint is not None and constraint.complete)
        finish = "stop" if done else "length" if n == config.max_tokens else None
        if finish == "length" and constraint is not None:
            log.warning(
                "the constrained output was cut at max_tokens=%d before it was complete: raise max_tokens",
                config.max_tokens,
            )
        if finish is not None and not at_stop_string:
            tail, at_stop_string = stops.push(decoder.flush())
            text += tail if at_stop_string else tail + stops.flush()
            finish = "stop" if at_stop_string or done else finish
        yield StreamPiece(
            text, token, len(prompt_ids), n, first_token_at - start, now - first_token_at, finish
        )
        if finish is not None:
            tokens.close()  # a stop string ends generation before max_tokens: release the step generator
            return

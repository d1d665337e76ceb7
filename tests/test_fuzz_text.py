"""Property-based tests of the text path: the tokenizer's round trip, the streaming detokenizer and
the sampler, over inputs hypothesis draws (a fixed number, derandomized)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tokenizers import Tokenizer

from edge_qwen.detokenize import StreamDecoder
from edge_qwen.sampling import Sampler, SamplerConfig
from tests.tiny import make_tiny_checkpoint

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REAL_TOKENIZER = Path.home() / ".cache/edge-qwen-test/hf-qwen2.5-coder-0.5b-instruct/tokenizer.json"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Text as users write it: any Unicode scalar (no lone surrogates), with the special tokens and
# the characters byte-level BPE splits unusually (CJK, emoji, combining marks, whitespace runs).
TEXT = st.lists(
    st.text(max_size=40)
    | st.sampled_from([*SPECIALS, "巴黎", "👩‍💻", "e\u0301", "\r\n\t  ", "\x00\x1b", "\ufeff"]),
    max_size=8,
).map("".join)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "hf", tied=True, seed=1)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@PROPERTIES
@given(text=TEXT)
def test_tokenizer_round_trip(tiny_tokenizer: Tokenizer, text: str) -> None:
    _round_trip(tiny_tokenizer, text)


@pytest.mark.slow
@settings(PROPERTIES, max_examples=300)
@given(text=TEXT)
def test_real_tokenizer_round_trip(text: str) -> None:
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"the real tokenizer is not at {REAL_TOKENIZER}")
    _round_trip(_real_tokenizer(), text)


_CACHE: dict[str, Tokenizer] = {}


def _real_tokenizer() -> Tokenizer:
    if "real" not in _CACHE:
        _CACHE["real"] = Tokenizer.from_file(str(REAL_TOKENIZER))
    return _CACHE["real"]


def _stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@PROPERTIES
@given(data=st.data(), skip=st.booleans())
def test_streamed_pieces_add_up_to_the_decode_of_any_ids(
    tiny_tokenizer: Tokenizer, data: st.DataObject, skip: bool
) -> None:
    """Any id sequence, even one that splits characters or is not UTF-8 at all."""
    vocab = tiny_tokenizer.get_vocab_size(with_added_tokens=True)
    ids = data.draw(st.lists(st.integers(0, vocab + 3), max_size=30))  # a few ids past the vocabulary
    pieces = _stream(tiny_tokenizer, ids, skip)
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=skip)


@PROPERTIES
@given(text=TEXT)
def test_streamed_text_never_shows_half_a_character(tiny_tokenizer: Tokenizer, text: str) -> None:
    """Streaming valid text: every piece is whole characters, none a replacement character."""
    ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
    pieces = _stream(tiny_tokenizer, ids, skip_special_tokens=False)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


LOGITS = arrays(
    np.float32,
    st.integers(1, 64),
    elements=st.floats(-1e4, 1e4, width=32) | st.just(float("-inf")),
)


@st.composite
def sampler_configs(draw: st.DrawFn) -> SamplerConfig:
    return SamplerConfig(
        temperature=draw(st.sampled_from([0.0, 0.01, 0.7, 1.0, 5.0])),
        top_k=draw(st.integers(0, 70)),
        top_p=draw(st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.01])),
        min_p=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.8])),
        presence_penalty=draw(st.sampled_from([0.0, 1.5, -1.0])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.5, -2.0])),
        seed=draw(st.integers(0, 2**32)),
    )


@PROPERTIES
@given(logits=LOGITS, config=sampler_configs(), data=st.data())
def test_the_sampler_picks_a_token_every_step_allows(
    logits: np.ndarray, config: SamplerConfig, data: st.DataObject
) -> None:
    """Whatever the options: a valid id, never a masked (-inf) token, within top-k, and the argmax
    when greedy; the same seed gives the same token."""
    assume(np.isfinite(logits).any())
    history = data.draw(st.lists(st.integers(0, logits.size - 1), max_size=10))
    prompt_len = data.draw(st.integers(0, len(history)))
    token = Sampler(config)(logits, history, prompt_len=prompt_len)
    assert 0 <= token < logits.size
    assert logits[token] > -math.inf
    penalized = config.repetition_penalty != 1 or config.presence_penalty or config.frequency_penalty
    if config.temperature == 0 and not penalized:
        assert logits[token] == logits.max()
    if config.top_k and not penalized and config.temperature > 0:
        kth = np.sort(logits)[::-1][min(config.top_k, logits.size) - 1]
        assert logits[token] >= kth
    assert Sampler(config)(logits, history, prompt_len=prompt_len) == token


@PROPERTIES
@given(logits=LOGITS, seed=st.integers(0, 2**32), data=st.data())
def test_an_allowed_mask_is_always_respected(logits: np.ndarray, seed: int, data: st.DataObject) -> None:
    allowed = data.draw(arrays(np.bool_, logits.shape))
    assume(allowed.any() and np.isfinite(logits[allowed]).any())
    token = Sampler(SamplerConfig(temperature=1.0, seed=seed))(logits, allowed=allowed)
    assert allowed[token] and logits[token] > -math.inf

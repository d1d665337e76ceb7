"""Streaming detokenization: pieces never split a character, and add up to the full decode."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from edge_qwen.detokenize import StreamDecoder, token_bytes

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_CALL = "<tool_call>"  # an added token that is not special, as in Qwen2.5

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(i)",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 문장입니다. 안녕하세요!",
    "Привет, мир! Как дела? Ünïcödé façade naïve café.",
    "مرحبا بالعالم. नमस्ते दुनिया।",
    "Emoji: 😀 😃 🎉 🚀 👍🏽 ❤️ 🇯🇵 🇺🇸 👨‍👩‍👧‍👦 🏳️‍🌈",
]

# Texts to stream: every kind of character a chat reply may hold, several not in the training data.
TEXTS = [
    "你好，世界！今天天气很好。",
    "鑫龘齉 — rare ideographs never seen in training",
    "こんにちは、世界。한국어도 됩니다.",
    "Family 👨‍👩‍👧‍👦, rainbow flag 🏳️‍🌈, flags 🇯🇵🇺🇸🇩🇪, skin tones 👍🏽👋🏿, keycap 1️⃣",
    "Math: ∀x ∈ ℝ, x² ≥ 0; arrows ⟶ ⇒; 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    'def f(x):\n    """Docstring."""\n\treturn {"k": [1, 2, 3]}  # café\n',
    "   leading spaces, trailing tabs\t\t\n\n\n  \r\n  mixed   runs      of    blanks  ",
    "Combining: e\u0301 n\u0303 a\u030a; Arabic مرحبا; Devanagari नमस्ते",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE (Qwen2's kind) with few merges, so multi-byte characters stay split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL,
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 5, trainer)
    tok.add_tokens([AddedToken(TOOL_CALL, special=False)])
    return tok


def stream(tok: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def assert_streams_like_decode(tok: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> None:
    pieces = stream(tok, ids, skip_special_tokens)
    full = tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces), pieces


def test_fixture_splits_multibyte_characters(tokenizer: Tokenizer) -> None:
    # The test is only meaningful if some token holds part of a character.
    partial = []
    for text in TEXTS:
        for token in tokenizer.encode(text).tokens:
            try:
                token_bytes(token).decode("utf-8")
            except UnicodeDecodeError:
                partial.append(token)
    assert len(partial) > 20, partial


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_decode_and_never_hold_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_text_is_emitted_as_soon_as_a_character_completes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a你b").ids
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert pieces[0] == "a"
    assert "".join(pieces) == "a你b"  # nothing is held back once the character is complete
    assert decoder.flush() == ""


def test_special_tokens_follow_skip_special_tokens(tokenizer: Tokenizer) -> None:
    text = f"<|im_start|>assistant\n你好 {TOOL_CALL}{{}}<|im_end|>\n<|endoftext|>"
    ids = tokenizer.encode(text).ids
    assert tokenizer.token_to_id("<|im_end|>") in ids and tokenizer.token_to_id(TOOL_CALL) in ids
    for skip in (True, False):
        assert_streams_like_decode(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(stream(tokenizer, ids, skip_special_tokens=True)) == f"assistant\n你好 {TOOL_CALL}{{}}\n"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == text


def test_special_token_inside_a_split_character(tokenizer: Tokenizer) -> None:
    # Skipped, the special token vanishes and the character joins up; kept, the character is
    # broken in the full decode too, and the stream must say the same.
    ids = tokenizer.encode("鑫").ids
    assert len(ids) > 1
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end is not None
    spliced = [ids[0], im_end, *ids[1:]]
    assert "".join(stream(tokenizer, spliced, skip_special_tokens=True)) == "鑫"
    assert_streams_like_decode(tokenizer, spliced, skip_special_tokens=False)


def test_random_ids_match_decode_including_invalid_utf8(tokenizer: Tokenizer) -> None:
    # Random tokens make invalid byte sequences; both sides must replace them the same way.
    rng = np.random.default_rng(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(300):
        ids = rng.integers(0, vocab, size=int(rng.integers(1, 40))).tolist()
        for skip in (True, False):
            assert_streams_like_decode(tokenizer, ids, skip_special_tokens=skip)


def test_incomplete_character_at_the_end_is_flushed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("x鑫").ids[:-1]  # cut inside the last character
    decoder = StreamDecoder(tokenizer)
    pushed = "".join(decoder.push(i) for i in ids)
    assert "\ufffd" not in pushed
    assert pushed + decoder.flush() == tokenizer.decode(ids)
    assert tokenizer.decode(ids).endswith("\ufffd")


def test_flush_resets_for_the_next_sequence(tokenizer: Tokenizer) -> None:
    decoder = StreamDecoder(tokenizer)
    for text in ("第一", "second 🚀", "第三"):
        out = "".join(decoder.push(i) for i in tokenizer.encode(text).ids) + decoder.flush()
        assert out == text


def test_unknown_ids_are_dropped_like_decode(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("ab").ids, 10**6]
    assert_streams_like_decode(tokenizer, ids)


def test_non_byte_level_decoder_is_rejected() -> None:
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="ByteLevel decoder.*WordPiece"):
        StreamDecoder(tok)


# -- the real Qwen2.5 tokenizer ------------------------------------------------------------------


def qwen_tokenizer_path() -> Path:
    default = Path.home() / ".cache/edge-qwen-peers/hf-qwen2.5-coder-0.5b-instruct"
    return Path(os.environ.get("EDGE_QWEN_HF_DIR", default)) / "tokenizer.json"


@pytest.mark.slow
def test_real_qwen_tokenizer_streams_like_decode() -> None:
    path = qwen_tokenizer_path()
    if not path.is_file():
        pytest.skip(f"no Qwen2.5 tokenizer at {path} (set EDGE_QWEN_HF_DIR to a Hugging Face folder)")
    tok = Tokenizer.from_file(str(path))
    split_seen = False
    for text in [
        *TEXTS,
        "<|im_start|>user\n写一个快速排序<|im_end|>\n<|im_start|>assistant\n好的🙂<|im_end|>",
    ]:
        ids = tok.encode(text, add_special_tokens=False).ids
        split_seen |= any(_is_partial(tok.id_to_token(i)) for i in ids)
        for skip in (True, False):
            pieces = stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in piece for piece in pieces)
    assert split_seen  # rare ideographs and emoji span several Qwen tokens
    rng = np.random.default_rng(1)
    for _ in range(50):
        ids = rng.integers(0, tok.get_vocab_size(), size=30).tolist()
        assert_streams_like_decode(tok, ids, skip_special_tokens=False)


def _is_partial(token: str | None) -> bool:
    try:
        token_bytes(token or "").decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False

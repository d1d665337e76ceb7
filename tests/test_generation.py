"""Generation: the KV cache (trim, rewind, memory cap), stop strings, options, streaming text, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import edge_qwen
from edge_qwen import cache as cache_module
from edge_qwen import sampling
from edge_qwen.cache import KVCache, common_prefix_len, kv_bytes_per_token
from edge_qwen.errors import InsufficientMemoryError
from edge_qwen.generation import GenerationConfig, StopStrings
from edge_qwen.sampling import make_sampler

SAMPLED = {"temperature": 1.0, "seed": 3}  # the tiny models' greedy output is one repeated token


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_fp32)


def ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


# -- the KV cache ---------------------------------------------------------------------------------


def test_cache_tracks_its_token_ids_and_trim_rewinds(model: edge_qwen.Model) -> None:
    cache = model.new_cache(64)
    first, second = ids(10), ids(6, seed=1)
    model.forward(first, cache)
    assert cache.tokens == first and cache.length == 10
    cache.trim(4)
    assert cache.tokens == first[:4]
    rewound = model.forward(second, cache)  # overwrites positions 4.. in place
    np.testing.assert_allclose(rewound, model.forward(first[:4] + second, model.new_cache(64)), atol=1e-5)
    cache.reset()
    assert cache.length == 0
    np.testing.assert_allclose(
        model.forward(second, cache), model.forward(second, model.new_cache(64)), atol=1e-5
    )
    with pytest.raises(ValueError, match="cannot trim a cache of length 6 to 7"):
        cache.trim(7)


def test_rewind_to_keeps_the_shared_prefix_and_one_token_to_run(model: edge_qwen.Model) -> None:
    cache = model.new_cache(64)
    model.forward(ids(10), cache)
    assert cache.rewind_to(ids(10)[:7] + [5, 6]) == 7 and cache.length == 7
    assert cache.rewind_to(ids(10)[:7]) == 6  # the last id must run again: its logits pick the next token
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_len([], [1]) == 0


def test_generate_tokens_reuses_the_cache_prefix(
    model: edge_qwen.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = model.new_cache(128)
    prompt = ids(20)
    first = list(model.generate_tokens(prompt, make_sampler(), 5, cache))
    ran: list[int] = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, c: (ran.append(len(x)), forward(x, c))[1])
    again = list(model.generate_tokens(prompt + first[:2] + [7], make_sampler(), 3, cache))
    assert ran[0] == 1  # only the new id 7 is prefilled: the prompt and first[:2] were cached
    fresh = list(model.generate_tokens(prompt + first[:2] + [7], make_sampler(), 3, model.new_cache(128)))
    assert again == fresh


def test_a_full_context_is_an_error_naming_the_numbers(model: edge_qwen.Model) -> None:
    cache = model.new_cache(8)
    with pytest.raises(edge_qwen.ContextFullError, match=r"0 cached \+ 9 new tokens > 8"):
        model.forward(ids(9), cache)


def test_default_cache_is_capped_by_available_memory(
    model: edge_qwen.Model, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    per_token = kv_bytes_per_token(model.config)
    assert per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
    assert model.new_cache().max_len == model.manifest.max_context  # plenty of memory here
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * 100 * per_token)
    with caplog.at_level(logging.WARNING, logger="edge_qwen.cache"):
        cache = model.new_cache()
    assert cache.max_len == 100
    assert "capping the context at 100 tokens" in caplog.text and "1024 tokens" in caplog.text
    assert model.new_cache(150).max_len == 150  # an explicit size that fits is what the caller asked for
    with pytest.raises(
        InsufficientMemoryError, match=r"KV cache of 512 tokens needs 0\.3 MB, but only 0\.1 MB"
    ):
        model.new_cache(512)  # one that does not fit is refused before it is allocated
    monkeypatch.setattr(cache_module, "available_memory", lambda: None)  # the system does not say
    assert model.new_cache().max_len == model.manifest.max_context


def test_available_memory_reads_the_system() -> None:
    available = cache_module.available_memory()
    assert available is None or available > 0


def test_one_shot_cache_is_sized_to_the_request(
    model: edge_qwen.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    init = KVCache.__init__
    monkeypatch.setattr(
        KVCache, "__init__", lambda self, c, n, *a: (sizes.append(n), init(self, c, n, *a))[1]
    )
    pieces = list(model.stream("hi", max_tokens=7))
    assert sizes == [pieces[-1].prompt_tokens + 7]


# -- stop strings ---------------------------------------------------------------------------------


def feed(stops: StopStrings, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, hit = stops.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + stops.flush(), False


def test_stop_string_spanning_pieces_is_caught_and_never_emitted() -> None:
    stops = StopStrings(["<END>"])
    assert stops.push("Hello <E") == ("Hello ", False)  # "<E" may start the stop string: held back
    assert stops.push("N") == ("", False)
    assert stops.push("D> more") == ("", True)
    assert feed(StopStrings(["\n\n"]), ["a\n", "\nb"]) == ("a", True)


def test_held_text_is_released_when_it_cannot_start_a_stop_string() -> None:
    stops = StopStrings(["<END>"])
    assert stops.push("x <E") == ("x ", False)
    assert stops.push("ND") == ("", False)
    assert stops.push("!") == ("<END!", False)
    assert feed(StopStrings(["<END>"]), ["no stop <", "EN"]) == ("no stop <EN", False)  # flushed at the end


def test_the_earliest_of_several_stop_strings_wins() -> None:
    assert feed(StopStrings(["world", "lo w"]), ["hel", "lo wor", "ld"]) == ("hel", True)
    assert feed(StopStrings(["aab"]), ["a", "a", "a", "b", "c"]) == ("a", True)
    assert feed(StopStrings([]), ["a", "b"]) == ("ab", False)


def test_stream_stops_at_a_stop_string_across_tokens(model: edge_qwen.Model) -> None:
    full = list(model.stream("hello", max_tokens=40, **SAMPLED))
    text = "".join(p.text for p in full)
    # A stop string made of the last character of one token's text and the first of the next one's:
    k = next(i for i in range(1, len(full)) if full[i - 1].text and full[i].text)
    stop = full[k - 1].text[-1] + full[k].text[0]
    stopped = list(model.stream("hello", max_tokens=40, stop=[stop], **SAMPLED))
    out = "".join(p.text for p in stopped)
    assert out == text[: text.find(stop)] and stop not in out
    assert stopped[-1].finish_reason == "stop" and all(p.finish_reason is None for p in stopped[:-1])
    assert len(stopped) <= k + 1  # generation ended at the token that completed the stop string


def test_extra_stop_ids_end_generation(model: edge_qwen.Model) -> None:
    tokens = [p.token_id for p in model.stream("hello", max_tokens=20, **SAMPLED)]
    stopped = list(model.stream("hello", max_tokens=20, stop_ids=[tokens[3]], **SAMPLED))
    assert [p.token_id for p in stopped] == tokens[: tokens.index(tokens[3]) + 1]
    assert stopped[-1].finish_reason == "stop"


# -- options and streamed text --------------------------------------------------------------------


def test_stream_passes_every_sampler_option(model: edge_qwen.Model) -> None:
    options = {
        "temperature": 0.9,
        "top_k": 50,
        "top_p": 0.95,
        "min_p": 0.02,
        "repetition_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.4,
        "seed": 11,
    }
    prompt_ids = model.encode_prompt("hello")
    expected = list(model.generate_tokens(prompt_ids, make_sampler(**options), 24))
    assert [p.token_id for p in model.stream("hello", max_tokens=24, **options)] == expected
    config = GenerationConfig(max_tokens=24, **options)
    assert [p.token_id for p in model.stream("hello", config)] == expected
    assert [p.token_id for p in model.stream("hello", config, seed=12)] != expected  # options override


def test_pieces_add_up_to_decoding_all_tokens(model: edge_qwen.Model) -> None:
    pieces = list(model.stream("巴黎是法国的首都", max_tokens=48, **SAMPLED))
    generated = [p.token_id for p in pieces if p.token_id not in model.stop_token_ids]
    assert "".join(p.text for p in pieces) == model.tokenizer.decode(generated)
    assert [p.generated_tokens for p in pieces] == list(range(1, len(pieces) + 1))
    last = pieces[-1]
    assert last.finish_reason in ("stop", "length") and last.prompt_tokens == len(
        model.encode_prompt("巴黎是法国的首都")
    )
    assert last.prefill_seconds > 0 and last.decode_seconds >= 0
    assert model.generate("巴黎是法国的首都", max_tokens=48, **SAMPLED) == "".join(p.text for p in pieces)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"stop": [""]}, "stop must be non-empty strings"),
        ({"stop_ids": [-1]}, "stop_ids must be token ids"),
    ],
)
def test_bad_options_are_value_errors_naming_the_value(
    model: edge_qwen.Model, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as e:
        model.stream("hi", **options)  # raised at the call, before any piece
    assert message in str(e.value)


def test_unknown_option_is_a_type_error_naming_it(model: edge_qwen.Model) -> None:
    with pytest.raises(TypeError, match="unknown generation option top_q"):
        model.generate("hi", top_q=0.5)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "messages must not be empty"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ],
)
def test_bad_messages_are_value_errors(
    model: edge_qwen.Model, prompt: list[dict[str, str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        model.generate(prompt)


def test_a_prompt_longer_than_the_context_names_the_numbers(model: edge_qwen.Model) -> None:
    long_prompt = "Paris " * 1100
    n = len(model.encode_prompt(long_prompt))
    with pytest.raises(ValueError, match=f"the prompt is {n} tokens, longer than the context of 1024 tokens"):
        model.generate(long_prompt)
    short = "Paris " * 500
    m = len(model.encode_prompt(short))
    with pytest.raises(
        edge_qwen.ContextFullError, match=rf"\({m} tokens\) \+ max_tokens \(600\) = {m + 600} > "
    ):
        model.generate(short, max_tokens=600)


def test_the_quickstart_example_runs(tiny_fp32: Path) -> None:
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "examples" / "quickstart.py"
    result = subprocess.run(
        [sys.executable, str(example), str(tiny_fp32), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "providers: CPUExecutionProvider" in result.stdout and "prefilled" in result.stdout


# -- the sampler's fast paths at Qwen's vocabulary ------------------------------------------------

QWEN_VOCAB = 151_936


def qwen_rows() -> list[np.ndarray]:
    """Rows of logits like a chat model's (a few strong tokens over a long tail), flat ones, masked ones."""
    rng = np.random.default_rng(7)
    peaked = rng.normal(0.0, 2.0, QWEN_VOCAB).astype(np.float32)
    peaked[rng.choice(QWEN_VOCAB, 8, replace=False)] += np.linspace(14, 6, 8, dtype=np.float32)
    flat = rng.normal(0.0, 0.3, QWEN_VOCAB).astype(np.float32)
    masked = peaked.copy()
    masked[rng.random(QWEN_VOCAB) < 0.5] = -np.inf
    return [peaked, peaked / np.float32(0.5), flat, masked]


def test_draw_matches_a_full_cumulative_sum() -> None:
    rng = np.random.default_rng(0)
    for row in qwen_rows():
        weights = np.exp(row - np.max(row))
        cdf = np.cumsum(weights, dtype=np.float64)
        for u in rng.random(300):
            expected = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
            assert sampling._draw(weights, float(u)) == expected


@pytest.mark.parametrize("k", [1, 5, 40, 1000, 60_000])
def test_top_k_matches_a_full_sort(k: int) -> None:
    for row in qwen_rows():
        alive = row[row > -np.inf]
        kth = np.sort(alive)[::-1][min(k, alive.size) - 1]
        expected = np.where(row >= kth, row, -np.inf)
        np.testing.assert_array_equal(sampling.apply_top_k(row, k), expected)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_top_p_matches_a_full_sort(p: float) -> None:
    for row in qwen_rows():
        alive = np.flatnonzero(row > -np.inf)
        probs = sampling.softmax(row[alive])
        ordered = np.sort(probs)[::-1]
        cutoff = ordered[int(np.searchsorted(np.cumsum(ordered, dtype=np.float64), p))]
        expected = np.full_like(row, -np.inf)
        expected[alive[probs >= cutoff]] = row[alive[probs >= cutoff]]
        np.testing.assert_array_equal(sampling.apply_top_p(row, p), expected)


# -- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_streams_cjk_and_emoji_whole() -> None:
    from tests import real_model

    m = edge_qwen.load(real_model.exported("q05-fp32", "--precision", "fp32"))
    for prompt in [
        "用中文写一句关于猫的话。",
        "Reply with three emoji about the sea 🌊, nothing else.",
        "日本語で挨拶して。",
    ]:
        pieces = list(m.stream(prompt, max_tokens=40))
        generated = [p.token_id for p in pieces if p.token_id not in m.stop_token_ids]
        assert "".join(p.text for p in pieces) == m.tokenizer.decode(generated)
        assert not any("\ufffd" in p.text for p in pieces), [p.text for p in pieces]
        assert any(ord(ch) > 0x2E80 for p in pieces for ch in p.text)  # CJK or emoji did come out

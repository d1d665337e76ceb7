"""Sampling steps on hand-made distributions, seeded reproducibility, and option validation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from edge_qwen.sampling import (
    SamplerConfig,
    apply_min_p,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_sampler,
    sample,
    softmax,
)

QWEN_VOCAB = 151_936


def logits_for(probs: list[float]) -> np.ndarray:
    """Logits whose softmax is exactly `probs` (up to float32 rounding)."""
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def kept(logits: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.isfinite(logits))]


def draws(sampler, logits: np.ndarray, n: int, history=()) -> np.ndarray:
    return np.array([sampler(logits, history) for _ in range(n)])


# -- single steps ---------------------------------------------------------------------------------


def test_top_p_keeps_exactly_the_nucleus() -> None:
    logits = logits_for([0.6, 0.3, 0.1])
    assert kept(apply_top_p(logits, 0.8)) == [0, 1]
    assert kept(apply_top_p(logits, 0.5)) == [0]  # the first token alone already reaches 0.5
    assert kept(apply_top_p(logits, 0.95)) == [0, 1, 2]
    assert kept(apply_top_p(logits, 1.0)) == [0, 1, 2]
    picked = draws(make_sampler(temperature=1.0, top_p=0.8, seed=0), logits, 5000)
    assert set(picked.tolist()) == {0, 1}


def test_top_p_order_independent_of_position() -> None:
    logits = logits_for([0.1, 0.3, 0.6])
    assert kept(apply_top_p(logits, 0.8)) == [1, 2]


def test_top_p_exact_when_candidates_fall_short() -> None:
    # A flat distribution whose top-1024 candidates hold far less than top_p takes the exact
    # fallback; compare with a full sort, which the implementation itself never does.
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(QWEN_VOCAB) * 0.5).astype(np.float32)
    for p in (0.3, 0.9):
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")
        m = int(np.searchsorted(np.cumsum(probs[order], dtype=np.float64), p))
        expected = np.sort(order[: m + 1])
        assert kept(apply_top_p(logits, p)) == expected.tolist()
        assert len(expected) > 1024


def test_top_p_after_top_k_only_sees_survivors() -> None:
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    # After top-2 the renormalized distribution is [4/7, 3/7]; 0.5 of it needs only the first.
    assert kept(apply_top_p(apply_top_k(logits, 2), 0.5)) == [0]
    assert kept(apply_top_p(apply_top_k(logits, 2), 0.6)) == [0, 1]


def test_top_k() -> None:
    logits = logits_for([0.1, 0.4, 0.2, 0.3])
    assert kept(apply_top_k(logits, 1)) == [1]
    assert kept(apply_top_k(logits, 2)) == [1, 3]
    assert kept(apply_top_k(logits, 0)) == [0, 1, 2, 3]
    assert kept(apply_top_k(logits, 10)) == [0, 1, 2, 3]
    ties = np.array([1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    assert kept(apply_top_k(ties, 1)) == [1, 2]  # ties with the k-th are kept, as in transformers


def test_top_k_one_is_greedy() -> None:
    rng = np.random.default_rng(0)
    top1 = make_sampler(temperature=1.5, top_k=1, seed=7)
    greedy = make_sampler()
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert top1(logits, []) == greedy(logits, []) == int(np.argmax(logits))


def test_min_p() -> None:
    logits = logits_for([0.5, 0.3, 0.1, 0.06, 0.04])
    # min_p=0.2: threshold 0.2 * 0.5 = 0.1; 0.1 itself stays, 0.06 and 0.04 go.
    assert kept(apply_min_p(logits, 0.19)) == [0, 1, 2]
    assert kept(apply_min_p(logits, 0.21)) == [0, 1]
    assert kept(apply_min_p(logits, 0.0)) == [0, 1, 2, 3, 4]
    assert kept(apply_min_p(logits, 1.0)) == [0]
    picked = draws(make_sampler(temperature=1.0, min_p=0.5, seed=1), logits, 2000)
    assert set(picked.tolist()) == {0, 1}


def test_temperature_scales_logits() -> None:
    logits = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    np.testing.assert_allclose(apply_temperature(logits, 0.5), [4.0, -2.0, 1.0])
    assert apply_temperature(logits, 0.5).dtype == np.float32


def test_repetition_penalty_matches_transformers_semantics() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.0], dtype=np.float32)
    history = np.array([0, 1, 1, 4], dtype=np.int64)  # repeats count once
    out = apply_repetition_penalty(logits, history, 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.0])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, -1.0, 0.0])  # input untouched


def test_presence_and_frequency_penalties_match_openai_semantics() -> None:
    logits = np.zeros(5, dtype=np.float32)
    generated = np.array([1, 3, 3, 3], dtype=np.int64)
    out = apply_presence_frequency_penalty(logits, generated, presence=0.5, frequency=0.25)
    # logit -= count * frequency + (count > 0) * presence
    np.testing.assert_allclose(out, [0.0, -0.75, 0.0, -1.25, 0.0])
    np.testing.assert_array_equal(logits, 0.0)


def test_sampler_penalties_use_the_right_window() -> None:
    # Token 0 leads narrowly; seen tokens lose the lead under each penalty, so greedy moves.
    logits = np.array([1.0, 0.9, 0.0], dtype=np.float32)
    history = [0, 2]
    assert make_sampler()(logits, history) == 0
    assert make_sampler(repetition_penalty=1.5)(logits, history) == 1
    # Presence/frequency count only the generated part, history[prompt_len:].
    presence = make_sampler(presence_penalty=0.5)
    assert presence(logits, history, prompt_len=1) == 0  # token 0 was in the prompt
    assert presence(logits, history, prompt_len=0) == 1
    assert make_sampler(frequency_penalty=0.2)(logits, [0], prompt_len=0) == 1


def test_sample_never_picks_masked_tokens() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([-np.inf, 0.0, -np.inf, 5.0, -np.inf], dtype=np.float32)
    assert {sample(logits, rng) for _ in range(2000)} == {1, 3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steps_match_transformers_logits_processors(seed: int) -> None:
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(1000) * 3).astype(np.float32)
    history = rng.integers(0, 1000, size=50)

    def hf(processor, x: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(history[None])
        return processor(ids, torch.from_numpy(x.copy())[None])[0].numpy()

    cases = [
        (lp.RepetitionPenaltyLogitsProcessor(1.3), lambda x: apply_repetition_penalty(x, history, 1.3)),
        (lp.TemperatureLogitsWarper(0.7), lambda x: apply_temperature(x, 0.7)),
        (lp.TopKLogitsWarper(37), lambda x: apply_top_k(x, 37)),
        (lp.TopPLogitsWarper(0.9), lambda x: apply_top_p(x, 0.9)),
        (lp.TopPLogitsWarper(0.3), lambda x: apply_top_p(x, 0.3)),
        (lp.MinPLogitsWarper(0.05), lambda x: apply_min_p(x, 0.05)),
    ]
    for processor, ours in cases:
        np.testing.assert_allclose(ours(logits), hf(processor, logits), rtol=1e-6)
    # Chained in generate's order: top-p then sees what top-k left.
    np.testing.assert_array_equal(
        apply_top_p(apply_top_k(logits, 100), 0.8),
        hf(lp.TopPLogitsWarper(0.8), hf(lp.TopKLogitsWarper(100), logits)),
    )


# -- the composed sampler -------------------------------------------------------------------------


def test_empirical_frequencies_match_softmax() -> None:
    logits = np.array([1.0, 0.0, 2.0, -1.0, 0.5], dtype=np.float32)
    temperature = 0.8
    p = softmax(logits / np.float32(temperature)).astype(np.float64)
    n = 20_000
    picked = draws(make_sampler(temperature=temperature, seed=1234), logits, n)
    freq = np.bincount(picked, minlength=logits.size) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * sigma), (freq, p)


def test_empirical_frequencies_after_top_k_and_top_p() -> None:
    probs = [0.5, 0.25, 0.15, 0.07, 0.03]
    logits = logits_for(probs)
    n = 20_000
    picked = draws(make_sampler(temperature=1.0, top_k=4, top_p=0.85, seed=99), logits, n)
    # top-4 then top-p 0.85 keeps [0.5, 0.25, 0.15] (mass 0.9 of the 0.97 that top-4 leaves).
    p = np.array([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    freq = np.bincount(picked, minlength=5) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * sigma + 1e-12), (freq, p)


def test_seeded_reproducibility() -> None:
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    options: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}
    a = draws(make_sampler(**options, seed=42), logits, 200)
    b = draws(make_sampler(**options, seed=42), logits, 200)
    c = draws(make_sampler(**options, seed=43), logits, 200)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_greedy_property_and_argmax() -> None:
    logits = np.array([0.1, 3.0, -2.0], dtype=np.float32)
    assert make_sampler().greedy
    assert make_sampler(temperature=0.0, top_k=5, top_p=0.5).greedy
    assert not make_sampler(temperature=0.7).greedy
    assert make_sampler()(logits, []) == 1


def test_full_qwen_vocabulary() -> None:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(QWEN_VOCAB) * 4).astype(np.float32)
    history = rng.integers(0, QWEN_VOCAB, size=300)
    sampler = make_sampler(
        temperature=0.7,
        top_k=100,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.3,
        seed=0,
    )
    for _ in range(5):
        token = sampler(logits, history, prompt_len=100)
        assert isinstance(token, int) and 0 <= token < QWEN_VOCAB
    token = make_sampler(temperature=1.0, top_p=0.95, seed=0)(logits, history)
    assert 0 <= token < QWEN_VOCAB
    assert make_sampler()(logits, []) == int(np.argmax(logits))


def test_sampler_config_round_trip() -> None:
    config = SamplerConfig(temperature=0.5, top_p=0.9, seed=3)
    assert make_sampler(temperature=0.5, top_p=0.9, seed=3).config == config
    with pytest.raises(AttributeError):
        config.temperature = 1.0  # type: ignore[misc]


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("temperature", -1, "temperature must be >= 0, got -1"),
        ("temperature", math.nan, "temperature must be >= 0, got nan"),
        ("temperature", math.inf, "temperature must be finite, got inf"),
        ("top_k", -3, "top_k must be an integer >= 0 (0 disables it), got -3"),
        ("top_k", 2.5, "top_k must be an integer >= 0 (0 disables it), got 2.5"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("min_p", 2, "min_p must be in [0, 1], got 2"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0 and finite, got 0.0"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
        ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3"),
        ("seed", -1, "seed must be None or an integer >= 0, got -1"),
        ("seed", "7", "seed must be None or an integer >= 0, got '7'"),
        ("top_p", "0.9", "top_p must be in (0, 1], got '0.9'"),
        ("temperature", True, "temperature must be >= 0, got True"),
    ],
)
def test_bad_options_raise_naming_the_value(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make_sampler(**{option: value})  # type: ignore[arg-type]
    assert str(info.value) == message


def test_bad_call_arguments() -> None:
    sampler = make_sampler(temperature=1.0, repetition_penalty=1.2, seed=0)
    logits = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match=r"logits must have shape \(vocab,\), got \(1, 10\)"):
        sampler(logits[None], [])
    with pytest.raises(ValueError, match="history holds token ids outside"):
        sampler(logits, [3, 10])
    with pytest.raises(ValueError, match="prompt_len must be in"):
        sampler(logits, [1, 2], prompt_len=3)

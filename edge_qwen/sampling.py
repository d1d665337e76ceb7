"""Token sampling: pure numpy steps over one row of logits, composed by `make_sampler`.

Every step takes logits of shape (vocab,) float32 and returns new logits; a token a step removes gets
-inf. Steps never fully sort the vocabulary (151,936 for Qwen2.5): top-k and top-p select candidates
with a partition, so a step costs a few O(vocab) passes. The order follows transformers' generate:
a constraint's mask (edge_qwen/constraints.py), penalties, temperature, top-k, top-p, min-p, then a
draw from the softmax over the survivors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from numbers import Integral, Real

import numpy as np

# How many of the most likely tokens top-p sorts first; real next-token distributions put nearly all
# their mass in far fewer, so the exact fallback below runs only for almost flat distributions.
TOP_P_CANDIDATES = 1024
# Logit gaps below the best token (e^-gap times as likely) within which top-k and top-p look first.
TOP_GAPS = (4.0, 8.0, 16.0)

NEG_INF = np.float32(-np.inf)

# Tokens per block when drawing from the cumulative distribution (see `_draw`).
DRAW_BLOCK = 1024

LogitsStep = Callable[[np.ndarray], np.ndarray]


def apply_mask(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Mask every token whose entry in the (vocab,) bool array `allowed` is False."""
    if allowed.shape != logits.shape:
        raise ValueError(f"allowed must have the logits' shape {logits.shape}, got {allowed.shape}")
    if not allowed.any():
        raise ValueError("allowed permits no token: a constraint must leave at least one")
    return np.where(allowed, logits, NEG_INF)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide the logits by a positive temperature (below 1 sharpens, above 1 flattens)."""
    return logits / np.float32(temperature)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (and any tied with the k-th), mask the rest; k=0 keeps all."""
    if k <= 0:
        return logits
    # The k-th largest of the whole row is the k-th largest of any top slice holding k or more, and
    # a slice near the best token is far cheaper to partition than the vocabulary.
    best = np.max(logits)
    for gap in TOP_GAPS:
        candidates = logits[logits >= best - np.float32(gap)]
        if candidates.size >= k:
            break
    else:
        candidates = logits[logits > -np.inf]  # partitioning many equal -inf is slow
        if k >= candidates.size:
            return logits
    kth = np.partition(candidates, candidates.size - k)[candidates.size - k]
    return np.where(logits >= kth, logits, NEG_INF)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely tokens whose total probability first reaches p (nucleus sampling).

    Tokens exactly as likely as the least likely kept one are kept too, so ties never depend on
    the order a sort happened to give them.
    """
    if p >= 1.0:
        return logits
    if not np.isneginf(logits).any():  # nothing masked yet: no need to gather the finite logits
        probs = softmax(logits)
        return np.where(probs >= _top_p_cutoff(logits, probs, p), logits, NEG_INF)
    alive = np.flatnonzero(logits > -np.inf)  # after top-k often only a few
    probs = softmax(logits[alive])
    keep = alive[probs >= _top_p_cutoff(logits[alive], probs, p)]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def _top_p_cutoff(logits: np.ndarray, probs: np.ndarray, p: float) -> np.float32:
    """The probability of the least likely token top-p keeps; probs = softmax(logits), all finite."""
    # Real distributions hold p of their mass within a few logits of the best token: look there
    # first, which costs a comparison instead of a partition of the whole vocabulary.
    best = np.max(logits)
    for gap in TOP_GAPS:
        near = probs[logits >= best - np.float32(gap)]
        if near.size > TOP_P_CANDIDATES:
            break
        cutoff = _cutoff_among(near, p)
        if cutoff is not None:
            return cutoff
    k = min(TOP_P_CANDIDATES, probs.size)
    # Partition the logits, not the probabilities: softmax keeps their order, and logits rarely
    # tie while underflowed probabilities (exact zeros) would, which makes partitioning slow.
    top = probs[np.argpartition(logits, probs.size - k)[probs.size - k :]]
    cutoff = _cutoff_among(top, p)
    return cutoff if cutoff is not None else _bisect_cutoff(probs, p, upper=np.min(top))


def _cutoff_among(candidates: np.ndarray, p: float) -> np.float32 | None:
    """The top-p cutoff when `candidates` (the most likely tokens' probabilities) reach p, else None."""
    top = np.sort(candidates)[::-1]
    mass = np.cumsum(top, dtype=np.float64)
    if mass[-1] < p:
        return None
    return top[int(np.searchsorted(mass, p))]  # first prefix whose mass reaches p


def _bisect_cutoff(probs: np.ndarray, p: float, upper: np.float32) -> np.float32:
    """Exact top-p cutoff without sorting: the largest t with mass(probs >= t) >= p.

    Non-negative float32 values order like their int32 bit patterns, so bisecting on the bits
    finds t exactly in at most 31 O(vocab) passes.
    """

    def mass_from(bits: int) -> float:
        t = np.int32(bits).view(np.float32)
        return float(np.sum(probs[probs >= t], dtype=np.float64))

    lo, hi = 0, int(np.float32(upper).view(np.int32))
    if mass_from(hi) >= p:  # ties with the smallest candidate already reach p
        return np.float32(upper)
    if mass_from(lo) < p:  # rounding left the whole distribution short of p: keep everything
        return np.float32(0.0)
    while hi - lo > 1:  # invariant: mass_from(lo) >= p > mass_from(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mass_from(mid) >= p else (lo, mid)
    return np.int32(lo).view(np.float32)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Mask tokens less likely than min_p times the most likely token; min_p=0 keeps all."""
    if min_p <= 0.0:
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
    threshold = np.max(logits) + np.float32(math.log(min_p))
    return np.where(logits >= threshold, logits, NEG_INF)


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """Penalize each token seen in history (as transformers): positive logit / penalty, negative * penalty."""
    if penalty == 1.0 or history.size == 0:
        return logits
    seen = np.unique(history)
    out = logits.copy()
    values = out[seen]
    out[seen] = np.where(values < 0, values * np.float32(penalty), values / np.float32(penalty))
    return out


def apply_presence_frequency_penalty(
    logits: np.ndarray, generated: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """Subtract OpenAI's penalties: presence once per generated token, frequency times its count."""
    if (presence == 0.0 and frequency == 0.0) or generated.size == 0:
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    out = logits.copy()
    out[ids] -= (counts * frequency + presence).astype(np.float32)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits that may hold -inf (at least one must be finite)."""
    # In place on one temporary: fresh 600 KB arrays cost page faults on every token.
    z = logits - np.max(logits)
    np.exp(z, out=z)
    z /= np.sum(z, dtype=np.float64).astype(np.float32)
    return z


def sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from the softmax over the finite logits, with one uniform from rng."""
    weights = logits - np.max(logits)
    np.exp(weights, out=weights)  # unnormalized probabilities; masked (-inf) tokens get exactly 0
    return _draw(weights, rng.random())


def _draw(weights: np.ndarray, u: float) -> int:
    """The index i whose cumulative weight first exceeds u times the total.

    A float64 cumulative sum over 151,936 weights costs more than the rest of sampling together, so
    the sum runs over blocks first and then within the one block the draw falls in.
    """
    n_full = weights.size - weights.size % DRAW_BLOCK
    block_sums = weights[:n_full].reshape(-1, DRAW_BLOCK).sum(axis=1, dtype=np.float64)
    block_cdf = np.cumsum(np.append(block_sums, np.sum(weights[n_full:], dtype=np.float64)))
    target = u * block_cdf[-1]
    b = min(int(np.searchsorted(block_cdf, target, side="right")), block_cdf.size - 1)
    start = b * DRAW_BLOCK
    block = weights[start : start + DRAW_BLOCK]
    before = block_cdf[b - 1] if b > 0 else 0.0
    i = int(np.searchsorted(before + np.cumsum(block, dtype=np.float64), target, side="right"))
    if i < block.size and block[i] > 0:
        return start + i
    # Rounding put the target past the block's last weight: take the last token with any weight.
    return int(np.flatnonzero(weights[: start + block.size])[-1])


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling options, validated when made; the defaults mean greedy decoding without penalties."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check("temperature", self.temperature, "finite", math.isfinite)
        _check("top_k", self.top_k, "an integer >= 0 (0 disables it)", lambda v: v >= 0, integer=True)
        _check("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check("repetition_penalty", self.repetition_penalty, "> 0 and finite", lambda v: 0 < v < math.inf)
        _check("presence_penalty", self.presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        _check("frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _check("seed", self.seed, "None or an integer >= 0", lambda v: v >= 0, integer=True)


def _check(name: str, value: object, rule: str, ok: Callable[[float], bool], integer: bool = False) -> None:
    """Raise ValueError naming the option, the rule and the value when value breaks the rule."""
    kind = Integral if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(float(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


class Sampler:
    """Picks the next token from one row of logits; holds its own seeded random generator."""

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        steps: list[LogitsStep] = []
        if config.temperature > 0:
            steps.append(partial(apply_temperature, temperature=config.temperature))
            if config.top_k > 0:
                steps.append(partial(apply_top_k, k=config.top_k))
            if config.top_p < 1.0:
                steps.append(partial(apply_top_p, p=config.top_p))
            if config.min_p > 0.0:
                steps.append(partial(apply_min_p, min_p=config.min_p))
        self._steps = tuple(steps)
        self._penalized = (
            config.repetition_penalty != 1.0
            or config.presence_penalty != 0.0
            or config.frequency_penalty != 0.0
        )

    @property
    def greedy(self) -> bool:
        """True when the sampler always takes the most likely token (temperature 0)."""
        return self.config.temperature == 0.0

    def __call__(
        self,
        logits: np.ndarray,
        history: Sequence[int] | np.ndarray = (),
        *,
        prompt_len: int = 0,
        allowed: np.ndarray | None = None,
    ) -> int:
        """The next token id; history is the ids so far, of which the first prompt_len are the prompt.

        `allowed`, a (vocab,) bool array, masks the tokens it marks False before anything else, so
        the penalties, temperature, top-k and top-p see only tokens a constraint permits. The
        repetition penalty looks at all of history; presence and frequency penalties, as in OpenAI's
        API, count only the generated part, history[prompt_len:].
        """
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1:
            raise ValueError(f"logits must have shape (vocab,), got {logits.shape}")
        if allowed is not None:
            logits = apply_mask(logits, allowed)
        if self._penalized:
            logits = self._penalize(logits, np.asarray(history, dtype=np.int64).reshape(-1), prompt_len)
        if self.greedy:
            return int(np.argmax(logits))
        for step in self._steps:
            logits = step(logits)
        return sample(logits, self._rng)

    def _penalize(self, logits: np.ndarray, ids: np.ndarray, prompt_len: int) -> np.ndarray:
        """Apply the configured penalties for history ids (the first prompt_len being the prompt)."""
        if not 0 <= prompt_len <= ids.size:
            raise ValueError(f"prompt_len must be in [0, len(history)={ids.size}], got {prompt_len}")
        if ids.size and (ids.min() < 0 or ids.max() >= logits.size):
            raise ValueError(
                f"history holds token ids outside [0, {logits.size}): min {ids.min()}, max {ids.max()}"
            )
        c = self.config
        logits = apply_repetition_penalty(logits, ids, c.repetition_penalty)
        generated = ids[prompt_len:]
        return apply_presence_frequency_penalty(logits, generated, c.presence_penalty, c.frequency_penalty)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())
        return f"Sampler({options})"


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A sampler for these options; raises ValueError naming any option out of range."""
    config = SamplerConfig(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    return Sampler(config)

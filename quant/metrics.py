"""Quality of a quantized model against its reference, from logits: the llama.cpp KL protocol."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (n, vocab), in float64 so that tiny KL divergences stay exact."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class QualityAccumulator:
    """Per-token statistics of a model against a reference, gathered chunk by chunk."""

    kld: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    nll_ref: list[np.ndarray] = field(default_factory=list)
    nll_model: list[np.ndarray] = field(default_factory=list)

    def add(self, ref_logprobs: np.ndarray, model_logits: np.ndarray, targets: np.ndarray) -> None:
        """ref_logprobs and model_logits (n, vocab) predict targets (n,): the next tokens."""
        model = log_softmax(model_logits)
        rows = np.arange(targets.size)
        # KL(ref || model) over the full vocabulary, per position.
        self.kld.append(np.maximum((np.exp(ref_logprobs) * (ref_logprobs - model)).sum(-1), 0.0))
        self.top1.append(ref_logprobs.argmax(-1) == model.argmax(-1))
        self.nll_ref.append(-ref_logprobs[rows, targets])
        self.nll_model.append(-model[rows, targets])

    def report(self) -> QualityReport:
        kld = np.concatenate(self.kld)
        ppl_ref = math.exp(float(np.concatenate(self.nll_ref).mean()))
        ppl_model = math.exp(float(np.concatenate(self.nll_model).mean()))
        return QualityReport(
            mean_kld=float(kld.mean()),
            p99_kld=float(np.percentile(kld, 99)),
            top1_agreement=float(np.concatenate(self.top1).mean()),
            ppl_reference=ppl_ref,
            ppl_model=ppl_model,
            ppl_ratio=ppl_model / ppl_ref,
            tokens_scored=int(kld.size),
        )


@dataclass(frozen=True)
class QualityReport:
    """How far a model's next-token distributions are from the reference's."""

    mean_kld: float
    p99_kld: float
    top1_agreement: float  # fraction of positions whose most likely token agrees
    ppl_reference: float
    ppl_model: float
    ppl_ratio: float
    tokens_scored: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

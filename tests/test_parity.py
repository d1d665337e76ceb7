"""The fp32/fp16 exports against transformers' own Qwen2ForCausalLM, on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import edge_qwen
from edge_qwen import engine as engine_module
from edge_qwen.sampling import make_sampler
from tests.conftest import TinyModel, export_tiny

FP32_ATOL = 1e-4
FP16_ATOL = 2e-3  # weights rounded to half precision, compute in fp32: measured max 2.1e-4 here


def hf_logits(ref, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()  # (seq, vocab)


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def test_prefill_and_decode_logits_match_transformers(tiny_fp32: Path, tiny_ref) -> None:  # noqa: ANN001
    m = edge_qwen.load(tiny_fp32)
    ids = prompt(10)
    continuation = prompt(8, seed=1)
    ref = hf_logits(tiny_ref, ids + continuation)
    cache = m.new_cache()
    logits = m.forward(ids, cache)
    np.testing.assert_allclose(logits, ref[len(ids) - 1], atol=FP32_ATOL, rtol=0)
    returned = [logits]
    for step, token in enumerate(continuation):
        logits = m.forward([token], cache)
        returned.append(logits)
        np.testing.assert_allclose(
            logits, ref[len(ids) + step], atol=FP32_ATOL, rtol=0, err_msg=f"decode step {step}"
        )
    # Every returned array is the model's own and is never written again by a later run.
    for step, kept in enumerate(returned):
        np.testing.assert_allclose(kept, ref[len(ids) - 1 + step], atol=FP32_ATOL, rtol=0)
    assert cache.length == len(ids) + len(continuation)
    # GroupQueryAttention wrote the keys into our own preallocated buffer (past and present share it):
    keys = cache.layers[0][0]  # (1, kv_heads, max_len, head_dim)
    assert np.all(np.abs(keys[0, :, : cache.length]).sum(-1) > 0)
    assert not keys[0, :, cache.length :].any()


def test_default_graph_keeps_every_position_and_honours_position_ids(
    tiny: TinyModel,
    tiny_ref,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """What onnxruntime-genai and optimum run: the package's graph with its defaults (no logits_start)."""
    pkg = export_tiny(tiny.hf_dir, tmp_path / "default")
    session = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = prompt(12)
    cfg = edge_qwen.load(pkg).config
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    feeds = {
        "input_ids": np.array([ids]),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "position_ids": np.arange(len(ids))[None],
    }
    feeds |= {
        f"past_key_values.{i}.{kv}": empty for i in range(cfg.num_hidden_layers) for kv in ("key", "value")
    }
    logits = session.run(["logits"], feeds)[0][0]
    np.testing.assert_allclose(logits, hf_logits(tiny_ref, ids), atol=FP32_ATOL, rtol=0)
    # Positions other than 0..n-1 rotate the keys and queries as they do in transformers.
    shifted = np.arange(7, 7 + len(ids))[None]
    logits = session.run(["logits"], feeds | {"position_ids": shifted})[0][0]
    with torch.no_grad():
        ref = tiny_ref(torch.tensor([ids]), position_ids=torch.tensor(shifted)).logits[0].numpy()
    np.testing.assert_allclose(logits, ref, atol=FP32_ATOL, rtol=0)


def test_cached_decoding_equals_recomputing(tiny_fp32: Path) -> None:
    m = edge_qwen.load(tiny_fp32)
    ids = prompt(6)
    cache = m.new_cache()
    cached = [m.forward(ids, cache)]
    for token in prompt(8, seed=3):
        ids.append(token)
        cached.append(m.forward([token], cache))
    for n, expected in zip(range(6, len(ids) + 1), cached, strict=True):
        np.testing.assert_allclose(m.forward(ids[:n], m.new_cache()), expected, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_shot(tiny_fp32: Path, tiny_ref, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    ids = prompt(23)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 5)
    m = edge_qwen.load(tiny_fp32)
    np.testing.assert_allclose(
        m.forward(ids, m.new_cache()), hf_logits(tiny_ref, ids)[-1], atol=FP32_ATOL, rtol=0
    )


def test_greedy_generation_matches_transformers_generate(tiny_fp32: Path, tiny_ref) -> None:  # noqa: ANN001
    m = edge_qwen.load(tiny_fp32)
    ids = prompt(7, seed=5)
    ours = list(m.generate_tokens(ids, make_sampler(temperature=0.0), max_tokens=32))
    with torch.no_grad():
        theirs = tiny_ref.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=sorted(m.stop_token_ids),
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    assert ours == theirs
    assert len(ours) >= 8, "the tiny model stopped too early for this test to mean much"


def test_fp16_export_within_tolerance(tiny: TinyModel, tiny_ref, tmp_path: Path) -> None:  # noqa: ANN001
    pkg = export_tiny(tiny.hf_dir, tmp_path / "fp16", precision="fp16")
    m = edge_qwen.load(pkg)
    assert m.manifest.precision == "fp16"
    ids = prompt(10)
    ref = hf_logits(tiny_ref, ids + [5, 6, 7])
    cache = m.new_cache()
    np.testing.assert_allclose(m.forward(ids, cache), ref[9], atol=FP16_ATOL, rtol=0)
    for step, token in enumerate([5, 6, 7]):
        np.testing.assert_allclose(m.forward([token], cache), ref[10 + step], atol=FP16_ATOL, rtol=0)
    fp32_size = (tiny.hf_dir.parent / "fp32" / "model.onnx.data").stat().st_size
    assert (pkg / "model.onnx.data").stat().st_size < 0.6 * fp32_size


def test_stop_ids_include_im_end_and_endoftext(tiny_fp32: Path) -> None:
    m = edge_qwen.load(tiny_fp32)
    vocab = m.tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= m.stop_token_ids


class Scripted:
    """A stand-in sampler that returns fixed tokens, to drive generation into a chosen id."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = iter(tokens)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        return next(self.tokens)


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_generation_stops_on_every_stop_id(tiny_fp32: Path, stop: str) -> None:
    m = edge_qwen.load(tiny_fp32)
    stop_id = m.tokenizer.token_to_id(stop)
    out = list(m.generate_tokens(prompt(5), Scripted([10, 11, 12, stop_id, 13, 14]), max_tokens=16))  # type: ignore[arg-type]
    assert out == [10, 11, 12, stop_id]

"""The GGUF reader on the real Qwen2.5-Coder-0.5B-Instruct GGUF (slow): config, tensors and tokenizer
against transformers, and an answer from its weights."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edge_qwen.export.gguf_reader import read_gguf
from edge_qwen.export.writer import compact_merges

REAL_GGUF = Path(
    os.environ.get("EDGE_QWEN_GGUF", Path.home() / ".cache/edge-qwen-models/qwen2.5-coder-0.5b-instruct.gguf")
)
# The same model as a Hugging Face folder, converted by transformers' GGUF loader (peers/gguf_to_hf.py).
HF_FOLDER = Path(
    os.environ.get(
        "EDGE_QWEN_HF_REFERENCE", Path.home() / ".cache/edge-qwen-peers/hf-qwen2.5-coder-0.5b-instruct"
    )
)
VARIED_TEXT = (
    "Hello, world! It's 2024-06-01; we'll pay $1,234.56 for 12345 items.\n"
    "中文测试：你好，世界！日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다.\n"
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️\n"
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n"
    "    return fib(n - 1) + fib(n - 2)  # tabs & spaces\n"
    "\n\n\n   \n  trailing spaces   \r\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<tool_call>{}</tool_call><|endoftext|>"
)


@pytest.fixture(scope="module")
def real():
    if not REAL_GGUF.is_file():
        pytest.skip(f"real GGUF not found at {REAL_GGUF} (set EDGE_QWEN_GGUF or run fetch_gguf.py)")
    return read_gguf(REAL_GGUF)


@pytest.fixture(scope="module")
def hf_folder() -> Path:
    if not (HF_FOLDER / "model.safetensors").is_file():
        pytest.skip(f"Hugging Face folder converted by transformers not found at {HF_FOLDER}")
    return HF_FOLDER


@pytest.mark.slow
def test_real_config(real):
    c = real.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151936, 896, 4864, 24)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (14, 2, 64)
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-6, 1e6, 32768)
    assert c.tie_word_embeddings is False  # this GGUF stores output.weight apart
    assert real.source_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@pytest.mark.slow
def test_real_config_matches_hf_folder(real, hf_folder):
    hf = json.loads((hf_folder / "config.json").read_text())
    mine = real.config.to_hf()
    shape_fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
    ]
    assert {k: mine[k] for k in shape_fields} == {k: hf[k] for k in shape_fields}
    assert mine["head_dim"] == (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    assert mine["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)
    rope_theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
    assert mine["rope_theta"] == rope_theta


@pytest.mark.slow
def test_real_tensors_match_hf_folder(real, hf_folder):
    from safetensors import safe_open

    with safe_open(str(hf_folder / "model.safetensors"), framework="np") as reference:
        assert set(reference.keys()) == real.names
        worst = 0.0
        for name in sorted(real.names):
            got, want = real.tensor(name), reference.get_tensor(name)
            assert got.shape == want.shape, name
            worst = max(worst, float(np.max(np.abs(got - want.astype(np.float32)))))
    assert worst <= 1e-6  # both dequantize the same blocks: in practice identical


def reference_tokenizer():
    transformers = pytest.importorskip("transformers")
    if (HF_FOLDER / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(HF_FOLDER), True
    # transformers' own GGUF tokenizer has no NFC normalizer: compare on NFC text only.
    return transformers.AutoTokenizer.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name), False


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(real):
    reference, applies_nfc = reference_tokenizer()
    mine = Tokenizer.from_str(compact_merges(real.tokenizer.tokenizer_json))  # as a package holds it
    texts = [VARIED_TEXT, *VARIED_TEXT.split("\n"), " leading space", "a" * 300, "e\u0301 cafe\u0301 \u212b"]
    for text in texts if applies_nfc else [unicodedata.normalize("NFC", t) for t in texts]:
        ids = mine.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert mine.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
        assert mine.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert mine.decode(mine.encode(VARIED_TEXT).ids, skip_special_tokens=False) == VARIED_TEXT
    assert mine.encode("12345").ids == [16, 17, 18, 19, 20]  # digits one by one
    # Every real token (the [PAD] fillers past 151664 are not tokens) has the same spelling and id.
    theirs = reference.get_vocab()
    assert mine.get_vocab() == {t: i for t, i in theirs.items() if i < 151665}


@pytest.mark.slow
def test_real_tokenizer_config(real):
    reference, _ = reference_tokenizer()
    cfg, gen = real.tokenizer.tokenizer_config, real.tokenizer.generation_config
    assert cfg["eos_token"] == reference.eos_token == "<|im_end|>"
    assert cfg["pad_token"] == reference.pad_token
    assert cfg["bos_token"] is None
    assert cfg["chat_template"] == reference.chat_template
    assert gen is not None and gen["eos_token_id"] == [151645, 151643]
    specials = {int(i) for i, t in cfg["added_tokens_decoder"].items() if t["special"]}
    assert specials == {i for i, t in reference.added_tokens_decoder.items() if t.special}


@pytest.mark.slow
def test_real_weights_answer_paris(real):
    """Independent of transformers' GGUF loader: Q/K rows are in Hugging Face order (no llama permute)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = transformers.Qwen2Config(**{k: v for k, v in real.config.to_hf().items() if k != "torch_dtype"})
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    model.load_state_dict({n: torch.from_numpy(real.tensor(n)) for n in real.names}, assign=True, strict=True)
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=config)  # its buffer was left on "meta"
    tok = Tokenizer.from_str(real.tokenizer.tokenizer_json)
    prompt = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with torch.no_grad():
        logits = model.eval()(torch.tensor([tok.encode(prompt).ids])).logits[0, -1]
    probs = torch.softmax(logits, dim=-1)
    assert tok.decode([int(probs.argmax())]) == "Paris"
    assert float(probs.max()) > 0.5  # 0.91 here; with llama's Q/K permutation undone it drops to 0.15

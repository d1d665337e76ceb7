"""The GGUF reader and tokenizer on a tiny qwen2 GGUF written in a fixture (tests/gguf_writer.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from edge_qwen.export.checkpoint import expected_names
from edge_qwen.export.gguf_reader import read_gguf
from edge_qwen.export.gguf_tokenizer import tokenizer_from_gguf
from edge_qwen.export.writer import compact_merges
from tests.gguf_writer import (
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    MERGES,
    TEMPLATE,
    hf_name,
    stored_type,
    tiny_tensors,
    tiny_vocab,
    write_tiny_gguf,
)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny-qwen2.gguf"
    return path, write_tiny_gguf(path)


# ---- the tiny GGUF ------------------------------------------------------------------------------


def test_config_from_metadata(tiny):
    path, _ = tiny
    config = read_gguf(path).config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert config.vocab_size == 288
    assert config.rms_norm_eps == 1e-6  # not float32's 9.99999997e-07
    assert config.rope_theta == 1e6
    assert config.max_position_embeddings == 128
    assert config.tie_word_embeddings is False


def test_tensors_come_back_in_hf_names_layout_and_values(tiny):
    path, expected = tiny
    ckpt = read_gguf(path)
    assert ckpt.names == {hf_name(n) for n in expected}
    assert ckpt.names == set(expected_names(ckpt.config))
    for name, want in expected.items():
        got = ckpt.tensor(hf_name(name))
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert ckpt.extra["tensor_types"]["model.embed_tokens.weight"] == "Q8_0"


def test_quantized_tensors_stay_within_half_a_step(tiny):
    path, _ = tiny
    ckpt = read_gguf(path)
    for name, original in tiny_tensors(ckpt.config.vocab_size, tied=False).items():
        if stored_type(name) != gguf.GGMLQuantizationType.Q8_0:
            continue
        # int8 per block of 32, scale amax/127 stored as f16: half a step, plus the scale's rounding.
        step = np.abs(original).reshape(-1, 32).max(axis=1) / 127
        err = np.abs(ckpt.tensor(hf_name(name)) - original).reshape(-1, 32).max(axis=1)
        assert np.all(err <= 0.57 * step), name


def test_load_is_lazy_and_hands_out_owned_arrays(tiny):
    path, _ = tiny
    ckpt = read_gguf(path)
    norm = ckpt.load("model.norm.weight")  # F32: a memmap view inside the reader
    assert norm.flags.writeable and norm.flags.owndata
    norm[:] = 0
    assert np.any(ckpt.tensor("model.norm.weight") != 0)
    with pytest.raises(KeyError, match="model.layers.9"):
        ckpt.tensor("model.layers.9.mlp.up_proj.weight")


def test_source_and_sha256(tiny):
    path, _ = tiny
    ckpt = read_gguf(str(path))
    assert ckpt.source == str(path)
    assert ckpt.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tied_embeddings_when_output_tensor_is_absent(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tied=True)
    ckpt = read_gguf(path)
    assert ckpt.config.tie_word_embeddings is True
    assert not ckpt.has("lm_head.weight")


def test_llama_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'llama': edge-qwen reads qwen2 GGUF"):
        read_gguf(path)


def test_not_a_gguf_file_is_refused_by_name(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}')
    with pytest.raises(ValueError, match=r"model\.safetensors is not a GGUF file"):
        read_gguf(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")


def test_truncated_gguf_is_refused_by_name(tiny, tmp_path):
    path, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        read_gguf(cut)


def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "holey.gguf"
    write_tiny_gguf(path, drop="blk.1.attn_k.bias")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        read_gguf(path)


# ---- the tiny tokenizer -------------------------------------------------------------------------


def test_tokenizer_encodes_and_decodes(tiny):
    path, _ = tiny
    files = read_gguf(path).tokenizer
    tok = Tokenizer.from_str(files.tokenizer_json)
    tokens, _ = tiny_vocab()
    ids = tok.encode("hello world<|im_end|>").ids
    assert [tokens[i] for i in ids] == ["hello", "Ġworld", "<|im_end|>"]
    assert [tokens[i] for i in tok.encode("x123").ids] == ["x", "1", "2", "3"]  # digits one by one
    assert tok.encode("e\u0301").ids == tok.encode("\u00e9").ids  # NFC
    text = "héllo\tworld\n\n  <tool_call>{}</tool_call> 🙂"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("hi<|im_start|><tool_call>").ids) == "hi<tool_call>"  # control is special
    assert tok.get_vocab_size() == sum(not t.startswith("[PAD") for t in tokens)  # fillers are no tokens


def test_tokenizer_config_and_generation_ids(tiny):
    path, _ = tiny
    files = read_gguf(path).tokenizer
    tokens, _ = tiny_vocab()
    cfg = files.tokenizer_config
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (None, "<|im_end|>", "<|endoftext|>")
    assert cfg["chat_template"] == TEMPLATE
    assert cfg["model_max_length"] == 128
    decoder = cfg["added_tokens_decoder"]
    assert {decoder[str(tokens.index(t))]["special"] for t in ("<|endoftext|>", "<|im_end|>")} == {True}
    assert decoder[str(tokens.index("<tool_call>"))]["special"] is False
    assert files.generation_config["eos_token_id"] == [
        tokens.index("<|im_end|>"),
        tokens.index("<|endoftext|>"),
    ]


def test_tokenizer_matches_transformers_qwen2_pipeline(tiny, tmp_path):
    """transformers builds Qwen2's pipeline itself from vocab.json + merges.txt; ids must agree."""
    transformers = pytest.importorskip("transformers")
    path, _ = tiny
    files = read_gguf(path).tokenizer
    mine = Tokenizer.from_str(compact_merges(files.tokenizer_json))  # as a package holds it
    folder = tmp_path / "hf-tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(mine.get_vocab(with_added_tokens=False)))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(files.tokenizer_config))
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [
        "hello world 12 ÿ",
        "e\u0301 café\r\n\n\t  x",
        "<|im_start|>hello<|im_end|>\n",
        "ab  cd   \n",
    ]:
        ids = mine.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert mine.decode(ids, skip_special_tokens=False) == reference.decode(ids), text


def test_packages_write_merges_as_strings_which_encode_alike(tiny):
    path, _ = tiny
    pairs = read_gguf(path).tokenizer.tokenizer_json
    compact = compact_merges(pairs)
    assert json.loads(pairs)["model"]["merges"][0] == ["h", "e"]
    assert json.loads(compact)["model"]["merges"] == MERGES
    before, after = Tokenizer.from_str(pairs), Tokenizer.from_str(compact)
    for text in ["hello world 12 ÿ", "e\u0301 café\r\n\n\t  x", "<|im_start|>hello<|im_end|>\n"]:
        assert after.encode(text).ids == before.encode(text).ids, text


def test_merges_that_a_space_would_split_are_left_as_pairs(tiny):
    path, _ = tiny
    data = json.loads(read_gguf(path).tokenizer.tokenizer_json)
    data["model"]["merges"].append(["a b", "c"])
    spaced = json.dumps(data)
    assert compact_merges(spaced) == spaced


def test_unknown_pre_tokenizer_is_refused():
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": ["a"],
    }
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'llama-bpe'"):
        tokenizer_from_gguf(metadata, model_max_length=8)

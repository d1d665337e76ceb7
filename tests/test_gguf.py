"""The GGUF reader: a tiny qwen2 GGUF written in a fixture, and the real Qwen2.5-Coder-0.5B GGUF (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from edge_qwen.export.checkpoint import expected_names
from edge_qwen.export.gguf_reader import read_gguf
from edge_qwen.export.gguf_tokenizer import tokenizer_from_gguf
from edge_qwen.export.writer import compact_merges

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 64, 2, 1, 16, 2
MERGES = ["h e", "l l", "Ġ w", "o r", "he ll", "hell o", "Ġw or", "Ġwor l", "Ġworl d", "1 2"]
SPECIALS = {"<|endoftext|>": 3, "<|im_start|>": 3, "<|im_end|>": 3, "<tool_call>": 4}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = byte_alphabet() + [m.replace(" ", "") for m in MERGES] + list(SPECIALS)
    types = [1] * (len(tokens) - len(SPECIALS)) + list(SPECIALS.values())
    pads = [f"[PAD{i}]" for i in range(len(tokens), 288)]  # llama.cpp pads to the embedding size
    return tokens + pads, types + [5] * len(pads)


def tiny_tensors(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in Hugging Face layout (out_features, in_features)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"blk.{i}"
        shapes |= {
            f"{p}.attn_norm.weight": (HIDDEN,),
            f"{p}.ffn_norm.weight": (HIDDEN,),
            f"{p}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"{p}.attn_q.bias": (HEADS * HEAD_DIM,),
            f"{p}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.attn_k.bias": (KV_HEADS * HEAD_DIM,),
            f"{p}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.attn_v.bias": (KV_HEADS * HEAD_DIM,),
            f"{p}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"{p}.ffn_gate.weight": (FFN, HIDDEN),
            f"{p}.ffn_up.weight": (FFN, HIDDEN),
            f"{p}.ffn_down.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def stored_type(name: str) -> gguf.GGMLQuantizationType:
    if name == "token_embd.weight" or name.endswith("ffn_down.weight"):
        return gguf.GGMLQuantizationType.Q8_0
    if name.endswith("attn_q.weight") or name.endswith("ffn_up.weight"):
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType.F32


def write_tiny_gguf(
    path: Path, arch: str = "qwen2", tied: bool = False, drop: str = ""
) -> dict[str, np.ndarray]:
    """Write a 2-layer qwen2 GGUF; returns GGUF name -> the float32 values a reader must give back."""
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    expected = {}
    for name, values in tiny_tensors(len(tokens), tied).items():
        if name == drop:
            continue
        qtype = stored_type(name)
        stored = gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(stored, qtype).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny-qwen2.gguf"
    return path, write_tiny_gguf(path)


def hf_name(gguf_name: str) -> str:
    table = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return f"{table[parts[0]]}.{parts[1]}"


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


# ---- the real Qwen2.5-Coder-0.5B-Instruct GGUF (slow) -----------------------------------------

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

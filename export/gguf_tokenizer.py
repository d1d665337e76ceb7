"""Rebuild Qwen2's tokenizer.json and tokenizer_config.json from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: llama.cpp keeps the byte-level vocabulary, the merges, a type per
token and the special ids as metadata. Put back together with the pipeline Qwen2 was trained with
(NFC, Qwen2's split regex, byte-level BPE), it encodes and decodes like transformers' Qwen2Tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .checkpoint import TokenizerFiles

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split: digits one by one, letters with one leading non-letter, runs of spaces.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values llama.cpp writes for vocabularies split by that regex.
QWEN2_PRE_TOKENIZERS = frozenset({"qwen2", "deepseek-r1-qwen"})

# llama.cpp's token types (gguf.TokenType): 3 marks special tokens, 4 added plain ones,
# 5 the "[PAD151665]" fillers that pad the vocabulary to the embedding size.
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5

# Qwen2.5 chat ends a turn with <|im_end|>; base models end the text with <|endoftext|>.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def tokenizer_from_gguf(metadata: Mapping[str, Any], model_max_length: int) -> TokenizerFiles:
    """tokenizer.json, tokenizer_config.json and generation ids from `tokenizer.*` GGUF metadata."""
    tokens, types = _vocabulary(metadata)
    merges = [_merge_pair(m) for m in metadata.get("tokenizer.ggml.merges", ())]
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)) if kind != TOKEN_UNUSED}
    added = _added_tokens(tokens, types)
    try:
        tokenizer = _qwen2_tokenizer(vocab, merges, [token for _, token in added])
    except Exception as e:  # tokenizers raises plain Exceptions, e.g. for a merge of unknown tokens
        raise ValueError(f"the GGUF's tokenizer metadata is inconsistent ({e}): the file is corrupted") from e

    ids = _special_ids(metadata, len(tokens))
    eos, pad = ids["eos"], ids["padding"]
    if metadata.get("tokenizer.ggml.add_bos_token"):
        logger.warning("GGUF asks to add a BOS token; Qwen2 never does, so none is added")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,  # Qwen2 has no BOS: its chat template starts with <|im_start|>
        "eos_token": tokens[eos] if eos is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(i): _added_token_entry(token) for i, token in added},
        "chat_template": metadata.get("tokenizer.chat_template"),
    }
    stop_ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
    for extra in (eos, metadata.get("tokenizer.ggml.eot_token_id")):
        if extra is not None and extra not in stop_ids:
            stop_ids.append(extra)
    generation = {"eos_token_id": stop_ids, "bos_token_id": ids["bos"], "pad_token_id": pad}
    return TokenizerFiles(
        tokenizer_json=tokenizer.to_str(), tokenizer_config=config, generation_config=generation
    )


def _vocabulary(metadata: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """The tokens and their llama.cpp types, once the metadata is checked to hold a Qwen2 BPE vocabulary."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: Qwen2 uses byte-level BPE ('gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "qwen2")
    if pre not in QWEN2_PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r}: edge-qwen splits text like Qwen2 "
            f"({', '.join(sorted(QWEN2_PRE_TOKENIZERS))})"
        )
    if not metadata.get("tokenizer.ggml.tokens"):
        raise ValueError("GGUF has no tokenizer.ggml.tokens: the file carries no tokenizer")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    return tokens, types


def _added_tokens(tokens: list[str], types: list[int]) -> list[tuple[int, AddedToken]]:
    """(id, token) of the special (control) and user-defined tokens, matched whole, never normalized."""
    return [
        (
            i,
            AddedToken(
                tok,
                single_word=False,
                lstrip=False,
                rstrip=False,
                normalized=False,
                special=kind == TOKEN_CONTROL,
            ),
        )
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]


def _special_ids(metadata: Mapping[str, Any], vocab_size: int) -> dict[str, int | None]:
    """The bos, eos and padding ids the metadata names (None where it names none), checked in range."""
    ids = {key: metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    for key, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(f"GGUF {key} token id {token_id} is outside the vocabulary of {vocab_size}")
    return ids


def _qwen2_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], added: list[AddedToken]
) -> Tokenizer:
    # The same pipeline as Qwen2.5's own tokenizer.json: no post-processor tokens, no BOS.
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Added in id order: each is already in the vocabulary, so it keeps its GGUF id.
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    return tokenizer


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right or " " in right:
        raise ValueError(f"malformed GGUF merge {merge!r}: expected two tokens separated by one space")
    return left, right


def _added_token_entry(token: AddedToken) -> dict[str, Any]:
    # The shape transformers writes under tokenizer_config.json's `added_tokens_decoder`.
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }

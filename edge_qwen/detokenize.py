"""Streaming detokenization: text that is safe to show as each token arrives.

Qwen2's tokenizer is byte-level BPE: a token stands for raw bytes, and one UTF-8 character (a CJK
ideograph, an emoji) is often split over several tokens. `StreamDecoder` maps each token to its bytes
once and feeds them to an incremental UTF-8 decoder, which holds back an incomplete character until
its last byte arrives. Each push costs O(token length), never a re-decode of the whole sequence, and
the pieces always add up to `tokenizer.decode(ids)`.
"""

from __future__ import annotations

import codecs

from tokenizers import Tokenizer, decoders


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table that byte-level BPE vocabularies use."""
    # Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft
    # hyphen) are shifted to code points from 256 up, in byte order.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


_BYTE_OF_CHAR: dict[str, int] = {char: byte for byte, char in _bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes:
    """The raw bytes a byte-level token stands for, as tokenizers' ByteLevel decoder reads it.

    A token with a character outside the byte alphabet (an added token such as "a b") is taken as
    plain text, as the decoder does.
    """
    try:
        return bytes(_BYTE_OF_CHAR[char] for char in token)
    except KeyError:
        return token.encode("utf-8")


class StreamDecoder:
    """Turns a stream of token ids into text pieces that never end inside a UTF-8 character.

    `push` returns the text completed by one more token (often "", while a character is still
    incomplete); `flush` returns what is left at the end and makes the decoder ready for a new
    sequence. Together the pieces equal `tokenizer.decode(ids, skip_special_tokens=...)`: bytes that
    are not valid UTF-8 become U+FFFD just as they do there, but a character split across tokens never
    does.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            found = type(tokenizer.decoder).__name__ if tokenizer.decoder is not None else "None"
            raise ValueError(
                f"StreamDecoder needs a tokenizer with a ByteLevel decoder (as Qwen2's), got {found}"
            )
        self._tokenizer = tokenizer
        self._special_ids = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )
        self.skip_special_tokens = skip_special_tokens
        # errors="replace" is what the decoder does with invalid bytes (from_utf8_lossy).
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly "")."""
        if self.skip_special_tokens and token_id in self._special_ids:
            return ""
        token = self._tokenizer.id_to_token(token_id)
        if token is None:  # tokenizer.decode drops ids it does not know (the model's padded vocab rows)
            return ""
        return self._utf8.decode(token_bytes(token))

    def flush(self) -> str:
        """End the sequence: return any held-back bytes (as U+FFFD if incomplete) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

"""A token's raw bytes, for the ``bytes`` of OpenAI logprobs (a client joins them to rebuild characters that
span several tokens; each such token decodes on its own to U+FFFD, so its text cannot give them).

Byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) spell every byte as one printable character of GPT-2's
``bytes_to_unicode`` table, so the token's vocabulary string maps back to its bytes exactly. SentencePiece byte
fallback spells a lone byte ``<0xNN>``. Anything else falls back to the UTF-8 of the decoded text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> printable character. Printable Latin-1 bytes stand for themselves; the others
    (controls, space, ...) take the characters from U+0100 on, in byte order. (transformers 5 no longer exports
    it from the GPT-2 tokenizer module, hence this copy.)"""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {ch: b for b, ch in bytes_to_unicode().items()}


def is_byte_level(tokenizer) -> bool:
    """Whether a (fast) tokenizer decodes with a ByteLevel decoder, alone or inside a Sequence."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def token_bytes_fn(tokenizer, token_text: Callable[[int], str]) -> Callable[[int], bytes]:
    """``token_id -> bytes`` for this tokenizer (see the module docstring)."""
    byte_level = is_byte_level(tokenizer)
    inverse = _unicode_to_bytes()
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # stored as plain text, not byte-level

    def token_bytes(token_id: int) -> bytes:
        piece = None if token_id in added else tokenizer.convert_ids_to_tokens([token_id])[0]
        if isinstance(piece, str):
            if byte_level and all(ch in inverse for ch in piece):
                return bytes(inverse[ch] for ch in piece)
            match = _BYTE_FALLBACK.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        return token_text(token_id).encode("utf-8")

    return token_bytes

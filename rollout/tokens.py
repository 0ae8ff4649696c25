"""Token ids -> the exact bytes they stand for, for a byte-level BPE tokenizer.

decode() of a single token that holds part of a multi-byte character gives U+FFFD; rewards that
compare bytes (RPT's prefix match) need the real bytes, read through the byte-level table.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    return {c: b for b, c in byte_level_alphabet().items()}


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes of each token (b"" for special tokens)."""
    byte_of, special = _byte_of(), set(tokenizer.all_special_ids)
    out = []
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if i in special:
            out.append(b"")
        elif all(c in byte_of for c in token):
            out.append(bytes(byte_of[c] for c in token))
        else:  # an added plain-text token, stored as its text
            out.append(token.encode("utf-8"))
    return out


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, with bytes that are not whole UTF-8 characters kept as surrogates
    (errors="surrogateescape"), so they compare exactly at the byte level."""
    return [b.decode("utf-8", errors="surrogateescape") for b in token_bytes(tokenizer, ids)]

"""Log-probs in OpenAI's shapes: each generated token's text, UTF-8 bytes and log-prob, with its most
likely alternatives (chat `logprobs: true, top_logprobs: k`; completions `logprobs: k`).

A token's text alone cannot be joined back into the reply when a character spans tokens (Chinese over a
byte-level tokenizer): its `bytes` can. They are read from the token's vocabulary entry: byte-level BPE
(GPT-2's alphabet of 256 printable characters, one per byte) and SentencePiece byte fallback (`<0xE4>`) give
the exact bytes; other vocabularies give the UTF-8 of the decoded piece.
"""

from __future__ import annotations

import re

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: printable Latin-1 bytes stand for themselves; the
    other bytes, in order, take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


class TokenText:
    """(text, bytes) of token ids for one tokenizer, cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and "ByteLevel" in repr(getattr(backend, "decoder", None))
        self.alphabet = byte_alphabet()
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            self.cache[token_id] = self._read(token_id)
        return self.cache[token_id]

    def _read(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self.special:
            if (match := BYTE_FALLBACK.fullmatch(piece)) is not None:
                data = bytes([int(match.group(1), 16)])
                return data.decode("utf-8", "replace"), list(data)
            if self.byte_level and all(c in self.alphabet for c in piece):
                data = bytes(self.alphabet[c] for c in piece)
                return data.decode("utf-8", "replace"), list(data)
            if "\u2581" in piece:  # SentencePiece marks a leading space with U+2581
                text = piece.replace("\u2581", " ")
                return text, list(text.encode("utf-8"))
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode("utf-8"))


def token_entry(text_of: TokenText, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
    """One generated token as the batcher hands it to the app (neutral of chat and completions)."""
    text, data = text_of(token_id)
    ranked = [(*text_of(t), value) for t, value in top or []]
    return {"token": text, "bytes": data, "logprob": logprob, "top": ranked}


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    if entries is None:
        return None
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, b, v in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict] | None, offset: int) -> dict | None:
    """A completion choice's `logprobs`: parallel lists; `top_logprobs` maps token text to log-prob (the
    drawn token included, as the legacy API did); `text_offset` counts characters from `offset`."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**{t: v for t, _, v in e["top"]}, e["token"]: e["logprob"]} for e in entries],
            "text_offset": offsets}

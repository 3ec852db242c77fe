"""A sample's text as its tokens come: released piece by piece, cut at the first stop string.

Work per token is bounded, not grown with the reply: only a window of the last few tokens is decoded (the
new text is what decoding the window adds to decoding its first tokens, which keeps word-joining spaces
right), half a multi-byte character is held until its other bytes arrive, and stop strings are matched
over the new characters only (`StopMatcher`).
"""

from __future__ import annotations

from lmforge.generation.stops import StopMatcher

WAIT_TOKENS = 8
"""Tokens to wait for the rest of a character (UTF-8 needs at most 4 byte tokens): past this, bytes that
never form one are text (U+FFFD), and the decoding window stays small."""


class IncrementalText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.window = 0
        """First token of the decoding window: context for the tokens from `read` on."""
        self.read = 0
        """Tokens whose text has been taken."""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._new_text(final=False)

    def flush(self) -> str:
        """The text still held (a cut character at the very end is dropped)."""
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        if self.read == len(self.tokens):
            return ""
        before = self.tokenizer.decode(self.tokens[self.window:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.tokens[self.window:], skip_special_tokens=True)
        if final:
            text = text.rstrip("\ufffd")
        elif text.endswith("\ufffd") and len(self.tokens) - self.read < WAIT_TOKENS:
            return ""  # half a character: wait for the rest of its bytes
        self.window, self.read = self.read, len(self.tokens)
        return text[len(before):]


class ReplyText:
    """Tokens in; released text and the stop string that ended it out."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.decoder = IncrementalText(tokenizer)
        self.matcher = StopMatcher(stop_strings)
        self.text = ""
        """All text taken so far, released or held back."""
        self.released = 0
        self.stop_string: str | None = None

    def push(self, token: int) -> str:
        """The text that may be released after `token` (may be empty). After a stop string matched, the
        caller ends the sample (`stop_string` is set)."""
        return self._take(self.decoder.push(token), final=False)

    def finish(self) -> str:
        """End of the sample: the held-back text goes out (unless the last text completes a stop string)."""
        return self._take(self.decoder.flush(), final=True)

    def _take(self, piece: str, final: bool) -> str:
        if self.stop_string is not None:
            return ""
        self.text += piece
        check = self.matcher.feed(piece, final=final)
        if check.matched is not None:
            self.stop_string = check.matched
            self.text = self.text[:check.release_to]
        out = self.text[self.released:check.release_to]
        self.released = max(self.released, check.release_to)
        return out
